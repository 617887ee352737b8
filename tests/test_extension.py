"""The compiled part of qgoft: build information, op registration and schemas, the ops library as a
standalone (C++-usable) library, TorchScript, and the pure-PyTorch fallback when the extension is
disabled, missing or built against another torch (each in a fresh interpreter)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qgoft

needs_extension = pytest.mark.skipif(not qgoft.extension_loaded(),
                                     reason="compiled extension not loaded (QGOFT_ALLOW_FALLBACK=1)")

SCHEMAS = {
    "givens_chain": "qgoft::givens_chain(Tensor x, Tensor angles, Tensor pairs, Tensor layer_offsets, "
                    "Tensor? scale) -> Tensor",
    "givens_chain_with_tops": "qgoft::givens_chain_with_tops(Tensor x, Tensor angles, Tensor pairs, "
                              "Tensor layer_offsets, Tensor? scale) -> (Tensor, Tensor)",
    "givens_chain_backward": "qgoft::givens_chain_backward(Tensor grad_out, Tensor x, Tensor angles, "
                             "Tensor pairs, Tensor layer_offsets, Tensor? scale, bool[3] output_mask, "
                             "Tensor? tops=None) -> (Tensor, Tensor, Tensor)",
    "quasi_givens_chain": "qgoft::quasi_givens_chain(Tensor x, Tensor blocks, Tensor pairs, "
                          "Tensor layer_offsets, Tensor? scale) -> Tensor",
    "quasi_givens_chain_with_tops": "qgoft::quasi_givens_chain_with_tops(Tensor x, Tensor blocks, Tensor pairs, "
                                    "Tensor layer_offsets, Tensor? scale) -> (Tensor, Tensor)",
    "quasi_givens_chain_backward": "qgoft::quasi_givens_chain_backward(Tensor grad_out, Tensor x, "
                                   "Tensor blocks, Tensor pairs, Tensor layer_offsets, Tensor? scale, "
                                   "bool[3] output_mask, Tensor? tops=None) -> (Tensor, Tensor, Tensor)",
}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def release(version: str) -> str:
    return version.split("+")[0]


def release_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in release(version).split(".")[:2])


# ------------------------------------------------------------------------------------------------
# build_info()
# ------------------------------------------------------------------------------------------------

@needs_extension
def test_build_info_keys_and_values():
    info = qgoft.build_info()
    for key in ("qgoft_version", "torch_version_running", "extension_loaded", "version", "torch_version_built",
                "abi", "torch_abi_floor", "cpu_isas_compiled", "cpu_isas_supported", "cpu_isa_selected",
                "cpu_tile_rows", "cuda_compiled", "cuda_loaded", "compiler", "num_threads", "ops_library"):
        assert key in info, key
    assert info["extension_loaded"] is True
    assert info["version"] == info["qgoft_version"] == qgoft.__version__
    assert info["torch_version_running"] == torch.__version__
    # the ops library is on the stable ABI: built against any torch >= the floor, running under any such torch
    assert info["abi"] == "stable"
    assert release_tuple(info["torch_abi_floor"]) >= (2, 10)
    assert release_tuple(info["torch_version_built"]) >= release_tuple(info["torch_abi_floor"])
    assert release_tuple(torch.__version__) >= release_tuple(info["torch_abi_floor"])
    compiled, supported = info["cpu_isas_compiled"], info["cpu_isas_supported"]
    assert "generic" in compiled and "generic" in supported
    assert set(compiled) <= {"generic", "avx2", "avx512"}
    assert set(supported) <= set(compiled)
    if IS_X86_64:
        assert {"avx2", "avx512"} <= set(compiled)
    assert info["cpu_isa_selected"] in supported
    # the default is the best variant the CPU supports
    best = [isa for isa in ("avx512", "avx2", "generic") if isa in supported][0]
    if not os.environ.get("QGOFT_CPU_ISA"):
        assert info["cpu_isa_selected"] == best
    assert isinstance(info["cpu_tile_rows"], int) and info["cpu_tile_rows"] >= 1
    if torch.version.cuda is None:  # a CPU-only torch cannot run the CUDA kernels
        assert info["cuda_loaded"] is False
    assert isinstance(info["cuda_compiled"], bool) and isinstance(info["cuda_loaded"], bool)
    if info["cuda_loaded"]:
        assert info["cuda_compiled"] and release(info["torch_version_built"]) == release(torch.__version__)
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert info["num_threads"] == torch.get_num_threads()
    assert Path(info["ops_library"]) == qgoft.ops_library_path() and qgoft.ops_library_path().is_file()
    assert qgoft._extension.extension_error() is None


@needs_extension
def test_build_info_reports_thread_count(num_threads):
    num_threads(1)
    assert qgoft.build_info()["num_threads"] == 1
    num_threads(2)
    assert qgoft.build_info()["num_threads"] == 2


@needs_extension
def test_isa_selection(cpu_isa):
    info = qgoft.build_info()
    assert info["cpu_isa_selected"] == cpu_isa
    assert info["cpu_tile_rows"] >= 1


@needs_extension
def test_set_cpu_isa_rejects_unknown_and_unsupported():
    c_module = qgoft._extension._C
    before = qgoft.build_info()["cpu_isa_selected"]
    assert c_module.set_cpu_isa("sse9000") is False
    assert c_module.set_cpu_isa("") is False
    for isa in ("generic", "avx2", "avx512"):
        if isa not in qgoft.build_info()["cpu_isas_supported"]:
            assert c_module.set_cpu_isa(isa) is False
    assert qgoft.build_info()["cpu_isa_selected"] == before


# ------------------------------------------------------------------------------------------------
# The ops
# ------------------------------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_schemas(name):
    packet = getattr(torch.ops.qgoft, name)
    assert str(packet.default._schema) == SCHEMAS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qgoft::{name}", "CPU")


@needs_extension
def test_forward_ops_have_autograd_and_fake_registrations():
    for name in ("givens_chain", "quasi_givens_chain", "givens_chain_with_tops", "quasi_givens_chain_with_tops"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qgoft::{name}", "Autograd")
    pairs = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    offsets = torch.tensor([0, 2], dtype=torch.int32)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(torch.randn(3, 4, dtype=torch.bfloat16))
        y = torch.ops.qgoft.givens_chain(fx, torch.zeros(2), pairs, offsets, None)
        assert y.shape == (3, 4) and y.dtype == torch.bfloat16
        gx, ga, gs = torch.ops.qgoft.givens_chain_backward(fx, fx, torch.zeros(2), pairs, offsets, None,
                                                           [True, True, False])
        assert gx.shape == (3, 4) and ga.shape == (2,) and gs.shape == (0,)


@needs_extension
def test_with_tops_fake_on_cuda_tensors():
    """The ``*_with_tops`` fake kernel on (fake) CUDA tensors, what torch.compile traces on a GPU machine: the tops'
    column count is a data-dependent size (unbacked), rows and the accumulation dtype are known, and the backward's
    fake accepts them. Runs without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()):
        x = torch.empty(2, 3, 16, dtype=torch.bfloat16, device="cuda")
        blocks = torch.empty(15, 2, 2, device="cuda")
        pairs = torch.empty(15, 2, dtype=torch.int32, device="cuda")
        offsets = torch.empty(5, dtype=torch.int32, device="cuda")
        y, tops = torch.ops.qgoft.quasi_givens_chain_with_tops(x, blocks, pairs, offsets, None)
        assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
        assert tops.shape[0] == 6 and isinstance(tops.shape[1], torch.SymInt) and tops.dtype == torch.float32
        assert str(tops.device) == "cuda:0"
        gx, gb, _ = torch.ops.qgoft.quasi_givens_chain_backward(x, x, blocks, pairs, offsets, None,
                                                               [True, True, False], tops)
        assert gx.shape == (2, 3, 16) and gb.shape == (15, 2, 2)
        with pytest.raises(RuntimeError, match=r"tops must be torch\.float32 \(the accumulation type of x\), got torch\.float64"):
            torch.ops.qgoft.quasi_givens_chain_backward(x, x, blocks, pairs, offsets, None, [True, True, False],
                                                        tops.double())


@needs_extension
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_ops_work_under_torchscript():
    @torch.jit.script
    def scripted(x: torch.Tensor, angles: torch.Tensor, pairs: torch.Tensor, offsets: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
        return torch.ops.qgoft.givens_chain(x, angles, pairs, offsets, scale)

    x = torch.randn(5, 4, dtype=torch.float64)
    angles = torch.tensor([0.3, -0.2, 1.1], dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [2, 3], [0, 2]], dtype=torch.int32)
    offsets = torch.tensor([0, 2, 3], dtype=torch.int32)
    scale = torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
    torch.testing.assert_close(
        scripted(x, angles, pairs, offsets, scale),
        qgoft.reference.givens_chain_reference(x, angles, pairs, offsets, scale), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Fresh interpreters
# ------------------------------------------------------------------------------------------------

def run_python(code: str, cwd: Path, extra_env: dict | None = None, timeout: float = 240.0) -> str:
    """Run ``code`` in a fresh interpreter (cwd: an empty directory, no qgoft variables inherited)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QGOFT_") and k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@needs_extension
def test_ops_library_loads_standalone_without_qgoft(tmp_path):
    """libqgoft_ops.so registers and runs the ops with torch alone (what a C++ program would link)."""
    out = run_python(f"""
        import math, sys
        import torch
        torch.ops.load_library({str(qgoft.ops_library_path())!r})
        assert not any(m == "qgoft" or m.startswith("qgoft.") for m in sys.modules), "qgoft was imported"
        x = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 5.0, 0.5]], dtype=torch.float64)
        theta = 0.3
        pairs = torch.tensor([[0, 2]], dtype=torch.int32)
        offsets = torch.tensor([0, 1], dtype=torch.int32)
        y = torch.ops.qgoft.givens_chain(x, torch.tensor([theta], dtype=torch.float64), pairs, offsets, None)
        c, s = math.cos(theta), math.sin(theta)
        # x_i <- c x_i + s x_j ; x_j <- -s x_i + c x_j  (rows times G(theta))
        want = x.clone()
        want[:, 0] = c * x[:, 0] + s * x[:, 2]
        want[:, 2] = -s * x[:, 0] + c * x[:, 2]
        assert torch.allclose(y, want, rtol=0, atol=1e-14), (y, want)
        blocks = torch.tensor([[[2.0, 3.0], [5.0, 7.0]]])
        z = torch.ops.qgoft.quasi_givens_chain(x.float(), blocks, pairs, offsets, torch.ones(3))
        assert torch.equal(z[:, 0], (2 * x[:, 0] + 5 * x[:, 2]).float())
        gx, ga, gs = torch.ops.qgoft.givens_chain_backward(torch.ones_like(x), x, torch.tensor([theta],
            dtype=torch.float64), pairs, offsets, None, [True, True, False])
        assert gx.shape == x.shape and ga.shape == (1,) and gs.shape == (0,)
        assert not any(m == "qgoft" or m.startswith("qgoft.") for m in sys.modules)
        print("STANDALONE-OK")
    """, tmp_path)
    assert "STANDALONE-OK" in out


@needs_extension
def test_ops_library_does_not_depend_on_python():
    readelf = shutil.which("readelf")
    if readelf is None or not sys.platform.startswith("linux"):
        pytest.skip("needs readelf on Linux")
    dynamic = subprocess.run([readelf, "-d", str(qgoft.ops_library_path())], capture_output=True, text=True,
                             check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("libtorch" in line or "libc10" in line for line in needed)
    assert not any("python" in line.lower() for line in needed), needed


@needs_extension
def test_ops_library_uses_only_the_stable_abi():
    """libqgoft_ops.so references no C++ symbol of torch (c10::, at::, torch::), only PyTorch's stable C
    shims, and needs libtorch_cpu alone of torch's libraries: what lets it load under every torch >= 2.10."""
    nm, readelf = shutil.which("nm"), shutil.which("readelf")
    if nm is None or readelf is None or not sys.platform.startswith("linux"):
        pytest.skip("needs nm and readelf on Linux")
    lib = str(qgoft.ops_library_path())
    undefined = subprocess.run([nm, "-D", "-C", "--undefined-only", lib], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    unstable = [line for line in undefined if any(ns in line for ns in ("c10::", "at::", "torch::", "caffe2::"))]
    assert not unstable, unstable
    shims = [line.split()[-1] for line in undefined if line.split()[-1].startswith(("aoti_torch_", "torch_"))]
    assert "torch_parallel_for" in shims and "torch_call_dispatcher" in shims, shims
    dynamic = subprocess.run([readelf, "-d", lib], capture_output=True, text=True, check=True).stdout
    torch_needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines()
                    if "(NEEDED)" in line and ("torch" in line or "c10" in line)]
    assert torch_needed == ["libtorch_cpu.so"], torch_needed


# ------------------------------------------------------------------------------------------------
# Build-time refusals (setup.py): a build that could not serve the installed torch stops with the command
# that works.
# ------------------------------------------------------------------------------------------------

def _setup_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("qgoft_setup", Path(__file__).resolve().parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the checks; setup() runs only as __main__
    return module


class _FakeTorch:
    def __init__(self, version, cuda=None):
        self.__version__ = version
        self.version = type("version", (), {"cuda": cuda})


@pytest.mark.parametrize("build, installed, cuda, expected", [
    (("2.14.1+cu130", "13.0"), ("2.9.1", None), False, "pip install 'torch>=2.10' && pip install ."),
    (("2.9.0", None), ("2.13.0", None), False, "pip install 'torch>=2.10' && pip install --no-build-isolation ."),
    (("2.14.1+cu130", "13.0"), ("2.13.0+cu128", "12.8"), True, "pip install --no-build-isolation ."),
    (("2.14.1+cpu", None), ("2.14.1+cu130", "13.0"), True, "QGOFT_CUDA=0 pip install ."),
])
def test_setup_refuses_builds_that_cannot_serve_the_installed_torch(build, installed, cuda, expected):
    setup = _setup_module()
    target = {"version": installed[0], "cuda": installed[1], "file": ""}
    with pytest.raises(SystemExit) as info:
        setup._check_torch(_FakeTorch(*build), target, cuda)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize("build, installed", [
    (("2.14.1+cu130", "13.0"), ("2.13.0+cpu", None)),  # the isolated build of the README's first command
    (("2.10.0", None), ("2.14.1+cu130", "13.0")),      # CPU kernels only for a CUDA torch (QGOFT_CUDA=0)
])
def test_setup_accepts_a_stable_abi_build_for_another_torch(build, installed):
    setup = _setup_module()
    setup._check_torch(_FakeTorch(*build), {"version": installed[0], "cuda": installed[1], "file": ""}, False)


@pytest.mark.parametrize("env, installed_cuda, want", [
    (None, None, False), (None, "13.0", True), ("AUTO", "12.8", True), ("0", "13.0", False), ("1", None, True),
    ("off", "13.0", False)])
def test_setup_builds_cuda_kernels_for_a_cuda_torch(monkeypatch, env, installed_cuda, want):
    setup = _setup_module()
    if env is None:
        monkeypatch.delenv("QGOFT_CUDA", raising=False)
    else:
        monkeypatch.setenv("QGOFT_CUDA", env)
    assert setup._want_cuda({"cuda": installed_cuda}) is want
    monkeypatch.setenv("QGOFT_CUDA", "maybe")
    with pytest.raises(SystemExit, match="QGOFT_CUDA must be AUTO, ON or OFF"):
        setup._want_cuda({"cuda": installed_cuda})


@needs_extension
def test_isa_environment_variable(tmp_path):
    out = run_python("""
        import qgoft
        print("ISA=" + qgoft.build_info()["cpu_isa_selected"])
    """, tmp_path, {"QGOFT_CPU_ISA": "generic"})
    assert "ISA=generic" in out


FALLBACK_CHECK = """
    import sys
    import warnings
    package_dir = {package_dir!r}
    if package_dir is not None:
        # An editable install adds a meta-path finder that would resolve qgoft.<missing module> of the copy
        # to the checkout's file; the copy must behave like an installed package.
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import qgoft
    import torch
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning) and "qgoft" in str(w.message)]
    assert runtime, [str(w.message) for w in caught]
    message = str(runtime[0].message)
    assert "Falling back" in message and {expected!r} in message, message
    assert qgoft.extension_loaded() is False
    info = qgoft.build_info()
    assert info["extension_loaded"] is False and {expected!r} in info["extension_error"]
    assert not hasattr(torch.ops.qgoft, "givens_chain"), "compiled ops registered although disabled"
    if package_dir is not None:
        assert qgoft.__file__.startswith(package_dir), qgoft.__file__

    # qgoft.nn.Linear works through the reference: identity at init, then the math of docs/MATH.md
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 5)
    for method in ("goft", "goft_scaled", "qgoft"):
        layer = qgoft.nn.Linear.from_linear(base, method=method)
        x = torch.randn(7, 12, requires_grad=True)
        assert not qgoft.ops.uses_compiled_kernel(x)
        assert torch.allclose(layer(x), base(x), rtol=0, atol=1e-6)
        with torch.no_grad():
            for p in layer.adapter_parameters():
                p.add_(0.1 * torch.randn_like(p))
        blocks = (layer.givens_blocks if method == "qgoft"
                  else qgoft.reference.blocks_from_angles(layer.givens_angles))
        R = qgoft.reference.dense_chain_matrix(blocks.double(), layer.givens_pairs, layer.givens_layer_offsets, 12)
        xr = x.double() @ R
        if method == "goft_scaled":
            xr = xr * layer.givens_scale.double()
        want = xr @ base.weight.double().T + base.bias.double()
        y = layer(x)
        assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        assert x.grad is not None and all(p.grad is not None for p in layer.adapter_parameters())
    print("FALLBACK-OK")
"""


def test_fallback_when_disabled(tmp_path):
    out = run_python(FALLBACK_CHECK.format(expected="QGOFT_DISABLE_EXTENSION", package_dir=None), tmp_path,
                     {"QGOFT_DISABLE_EXTENSION": "1"})
    assert "FALLBACK-OK" in out


def _package_copy(tmp_path: Path) -> Path:
    source = Path(qgoft.__file__).resolve().parent
    root = tmp_path / "copy"
    shutil.copytree(source, root / "qgoft", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _with_build_meta(tmp_path: Path, **values: str) -> Path:
    """A copy of the package whose _build_meta.py has these values."""
    root = _package_copy(tmp_path)
    meta = root / "qgoft" / "_build_meta.py"
    if not meta.exists():
        pytest.skip("qgoft was not built (no _build_meta.py)")
    lines = meta.read_text().splitlines()
    for key, value in values.items():
        assert any(line.startswith(f"{key} =") for line in lines), f"no {key} in _build_meta.py"
        lines = [f"{key} = {value!r}" if line.startswith(f"{key} =") else line for line in lines]
    meta.write_text("\n".join(lines) + "\n")
    return root


def test_fallback_when_torch_is_older_than_the_abi_floor(tmp_path):
    root = _with_build_meta(tmp_path, TORCH_ABI_FLOOR="99.0")
    out = run_python(FALLBACK_CHECK.format(expected="needs torch >= 99.0", package_dir=str(root)), root,
                     {"PYTHONPATH": str(root)})
    assert "FALLBACK-OK" in out


@needs_extension
def test_ops_library_loads_under_another_torch_than_built(tmp_path):
    """The loader ties the stable-ABI ops library to the floor only, not to the torch it was built against;
    a CUDA library built for another torch release is not loaded (its reason is reported)."""
    root = _with_build_meta(tmp_path, TORCH_VERSION="2.10.0+cu999", CUDA_LIBRARY="libqgoft_cuda.so")
    out = run_python(f"""
        import warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import qgoft
        assert not [w for w in caught if "Falling back" in str(w.message)], [str(w.message) for w in caught]
        assert qgoft.__file__.startswith({str(root)!r}), qgoft.__file__
        assert qgoft.extension_loaded(), qgoft._extension.extension_error()
        info = qgoft.build_info()
        assert info["torch_version_built"] != "2.10.0+cu999"  # the library's own record (C++)
        assert info["cuda_compiled"] and not info["cuda_loaded"]
        assert "built against torch 2.10.0+cu999" in info["cuda_error"], info["cuda_error"]
        assert not qgoft._extension.has_kernel("cuda") and qgoft._extension.has_kernel("cpu")
        x = torch.randn(3, 4, dtype=torch.float64)
        pairs = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        y = torch.ops.qgoft.givens_chain(x, torch.zeros(2, dtype=torch.float64), pairs,
                                         torch.tensor([0, 2], dtype=torch.int32), None)
        assert torch.equal(x, y)
        print("LOADED-OK")
    """, root, {"PYTHONPATH": str(root)})
    assert "LOADED-OK" in out


def test_fallback_when_not_built(tmp_path):
    root = _package_copy(tmp_path)
    (root / "qgoft" / "_build_meta.py").unlink(missing_ok=True)
    out = run_python(FALLBACK_CHECK.format(expected="not built", package_dir=str(root)), root,
                     {"PYTHONPATH": str(root)})
    assert "FALLBACK-OK" in out


def test_fallback_when_ops_library_missing(tmp_path):
    root = _package_copy(tmp_path)
    if not (root / "qgoft" / "_build_meta.py").exists():
        pytest.skip("qgoft was not built (no _build_meta.py)")
    (root / "qgoft" / "libqgoft_ops.so").unlink(missing_ok=True)
    out = run_python(FALLBACK_CHECK.format(expected="not found", package_dir=str(root)), root,
                     {"PYTHONPATH": str(root)})
    assert "FALLBACK-OK" in out
