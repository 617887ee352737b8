"""Deployment paths of models with qgoft layers: TorchScript (script/trace, save/load), torch.compile,
torch.export, AOTInductor, and C++ inference (tools/check_cpp_inference.sh)."""
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor  # aoti_load_package (not imported by ``import torch``)
import torch.nn.functional as F
from torch import nn

import qgoft
import qgoft.export
import qgoft.ops
from qgoft.nn import Linear

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["goft", "goft_scaled", "qgoft"]
LAYOUTS = ["parallel", "butterfly"]

# TorchScript is deprecated in recent torch releases (still supported; the C++ path relies on it).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

requires_ops = pytest.mark.skipif(not qgoft.extension_loaded(), reason="compiled qgoft ops not loaded")


class Block(nn.Module):
    """Two adapted layers (the second without bias) around a nonlinearity."""

    def __init__(self, method: str, layout: str, d: int = 12, hidden: int = 10, out: int = 5) -> None:
        super().__init__()
        self.first = Linear(d, hidden, method=method, layout=layout)
        self.second = Linear(hidden, out, bias=False, method=method, layout=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(F.gelu(self.first(x)))


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every adapter away from the identity (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, Linear):
                for param in layer.adapter_parameters():
                    param.add_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return module


def make_block(method: str, layout: str = "parallel") -> Block:
    torch.manual_seed(0)
    return randomized(Block(method, layout))


def example_input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def jit_roundtrip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def qgoft_calls(graph_text: str) -> int:
    return graph_text.count("qgoft::givens_chain") + graph_text.count("qgoft::quasi_givens_chain")


# ------------------------------------------------------------------------------------------------
# TorchScript
# ------------------------------------------------------------------------------------------------

@requires_ops
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_script_and_trace_match_eager_and_reload(method, layout):
    model = make_block(method, layout)
    x = example_input(2, 3, 12)
    eager = model(x)
    scripted = torch.jit.script(model)
    traced = torch.jit.trace(model, (x,))
    assert qgoft_calls(str(traced.inlined_graph)) == 2
    assert qgoft_calls(str(scripted.inlined_graph)) > 0  # both ops appear (the method is a run-time str)
    for module in (scripted, traced):
        assert torch.equal(module(x), eager)
        reloaded = jit_roundtrip(module)
        assert torch.equal(reloaded(x), eager)
    # The scripted module is shape-generic; the traced one too (the ops take any leading dims).
    x2 = example_input(7, 12)
    assert torch.equal(scripted(x2), model(x2))
    assert torch.equal(traced(x2), model(x2))


@requires_ops
@pytest.mark.parametrize("method", METHODS)
def test_scripted_gradients_match_eager(method):
    model = make_block(method, "butterfly")
    scripted = torch.jit.script(model)
    x = example_input(4, 12).requires_grad_()
    eager_grads = torch.autograd.grad(model(x).square().sum(), [x, *model.first.adapter_parameters()])
    script_grads = torch.autograd.grad(scripted(x).square().sum(),
                                       [x, *model.first.adapter_parameters()])
    for eager, script in zip(eager_grads, script_grads):
        torch.testing.assert_close(script, eager, rtol=1e-6, atol=1e-6)


@requires_ops
@pytest.mark.parametrize("method", METHODS)
def test_script_after_merge_and_with_adapters_disabled(method):
    model = make_block(method, "butterfly").eval()
    x = example_input(3, 12)
    adapted = model(x)
    model.first.merge()
    model.second.merge()
    scripted = jit_roundtrip(torch.jit.script(model))
    torch.testing.assert_close(scripted(x), adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(scripted(x), model(x))
    frozen = torch.jit.freeze(torch.jit.script(model))
    assert torch.equal(frozen(x), model(x))
    assert qgoft_calls(str(frozen.graph)) == 0  # merged: the frozen graph is plain linear layers

    model.first.disable_adapters()  # merged + disabled: the kept original weight
    base = F.linear(x, model.first._unmerged_weight, model.first.bias)
    assert torch.equal(torch.jit.script(model).first(x), base)
    model.first.enable_adapters()
    model.first.unmerge()
    model.second.unmerge()
    assert torch.equal(torch.jit.script(model)(x), model(x))


@requires_ops
def test_script_float64_adapter_and_bfloat16_base():
    layer = randomized(Linear(9, 4, method="goft_scaled", adapter_dtype=torch.float64))
    x = example_input(3, 9)
    assert torch.equal(torch.jit.script(layer)(x), layer(x))
    layer = randomized(Linear(9, 4, method="qgoft", layout="sequential")).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(torch.jit.script(layer)(xb), layer(xb))


def test_script_without_compiled_ops_explains(monkeypatch):
    monkeypatch.setattr(qgoft._extension, "_loaded", False)
    with pytest.raises(RuntimeError, match="needs the compiled qgoft ops"):
        torch.jit.script(make_block("qgoft"))


def test_trace_records_reference_without_compiled_ops(monkeypatch):
    monkeypatch.setattr(qgoft.ops, "uses_compiled_kernel", lambda x: False)
    model = make_block("qgoft", "butterfly")
    x = example_input(4, 12)
    with pytest.warns(torch.jit.TracerWarning):  # the layout offsets become trace constants
        traced = torch.jit.trace(model, (x,), check_trace=False)
    assert qgoft_calls(str(traced.inlined_graph)) == 0
    assert torch.equal(traced(x), model(x))


@requires_ops
def test_save_torchscript_helper(tmp_path):
    model = make_block("goft_scaled", "butterfly")
    x = example_input(2, 12)
    loaded = qgoft.export.save_torchscript(model, tmp_path / "m.pt", x)
    assert torch.equal(loaded(x), model(x))
    traced = qgoft.export.save_torchscript(model, tmp_path / "t.pt", (x,), trace=True)
    assert torch.equal(traced(x), model(x))
    with pytest.raises(ValueError, match="example"):
        qgoft.export.save_torchscript(model, tmp_path / "u.pt", trace=True)


# ------------------------------------------------------------------------------------------------
# torch.compile and torch.export
# ------------------------------------------------------------------------------------------------

def _forward_backward(module: nn.Module, x: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    return out, grads


def _check_compiled(module: nn.Module, compiled: nn.Module, x: torch.Tensor, tol: float) -> None:
    out, grads = _forward_backward(compiled, x)
    eager_out, eager_grads = _forward_backward(module, x)
    torch.testing.assert_close(out, eager_out, rtol=tol, atol=tol)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@requires_ops
@pytest.mark.parametrize("method", METHODS)
def test_compile_fullgraph_layer_aot_eager(method):
    """Dynamo + fake kernels + AOT autograd, without codegen (fast): forward and backward match eager."""
    torch._dynamo.reset()
    layer = randomized(Linear(12, 6, method=method, layout="butterfly"))
    x = example_input(5, 12)
    _check_compiled(layer, torch.compile(layer, fullgraph=True, backend="aot_eager"), x, 1e-6)


@requires_ops
def test_compile_fullgraph_model_aot_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomized(nn.Sequential(Linear(12, 10, method="qgoft", layout="butterfly"), nn.GELU(),
                                     Linear(10, 8, method="goft_scaled"), nn.Tanh(),
                                     Linear(8, 4, method="goft", layout="sequential")))
    x = example_input(2, 3, 12)
    _check_compiled(model, torch.compile(model, fullgraph=True, backend="aot_eager"), x, 1e-6)


@requires_ops
def test_compile_fullgraph_inductor_layer():
    """Inductor (generated C++ around the qgoft op calls; default backend): forward and the gradients of
    x, angles and scale match eager."""
    torch._dynamo.reset()
    layer = randomized(Linear(12, 6, method="goft_scaled", layout="butterfly"))
    _check_compiled(layer, torch.compile(layer, fullgraph=True), example_input(5, 12), 1e-5)


@requires_ops
def test_compile_training_step_has_no_graph_break():
    """torch.compile's default mode (what most training scripts and the HF Trainer use, not fullgraph) traces a
    training step through adapted layers in one graph: no qgoft op may break it (the forward that keeps segment
    tops has a data-dependent output shape, so traced steps run the plain forward op)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomized(nn.Sequential(Linear(12, 10, method="qgoft"), nn.GELU(), Linear(10, 8, method="goft_scaled")))
    x = example_input(4, 12).requires_grad_()

    def step(inp):
        return model(inp).square().sum()

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()


def test_compile_reference_fallback(monkeypatch):
    """The pure-PyTorch fallback compiles with graph breaks (its input checks read layer offsets from tensors,
    so fullgraph=True is not possible) and matches eager."""
    torch._dynamo.reset()
    monkeypatch.setattr(qgoft.ops, "uses_compiled_kernel", lambda x: False)
    layer = randomized(Linear(12, 6, method="goft_scaled", layout="butterfly"))
    x = example_input(5, 12)
    _check_compiled(layer, torch.compile(layer, backend="aot_eager"), x, 1e-6)
    torch._dynamo.reset()


@requires_ops
@pytest.mark.parametrize("method", METHODS)
def test_export_runs_and_matches(method):
    model = make_block(method, "butterfly").eval()
    x = example_input(4, 12)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    code = program.graph_module.code
    assert code.count("torch.ops.qgoft.") == 2
    for rows in (4, 9):
        xr = example_input(rows, 12)
        assert torch.equal(program.module()(xr), model(xr))


# ------------------------------------------------------------------------------------------------
# C++ inference and AOTInductor (tools/check_cpp_inference.sh)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpp_check(tmp_path_factory):
    """Runs tools/check_cpp_inference.sh once (build, save from Python, run from C++, compare)."""
    if not qgoft.extension_loaded():
        pytest.skip("compiled qgoft ops not loaded")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHON"] = sys.executable
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool, path=env["PATH"]) is None]
    if missing:
        pytest.skip(f"C++ inference check needs {' and '.join(missing)}")
    work_dir = tmp_path_factory.mktemp("cpp_inference")
    env["QGOFT_CPP_WORK_DIR"] = str(work_dir)
    env["QGOFT_CHECK_AOTI"] = "1"
    result = subprocess.run(["bash", str(ROOT / "tools" / "check_cpp_inference.sh")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    return result, work_dir


def test_cpp_inference_matches_python(cpp_check):
    result, _ = cpp_check
    assert result.returncode == 0, result.stdout[-6000:]
    assert result.stdout.count("ok  ") == 3, result.stdout[-6000:]  # scripted, traced, AOTInductor


def test_aoti_package_from_python(cpp_check):
    """The AOTInductor package the check wrote loads in Python and matches eager, also on another input."""
    result, work_dir = cpp_check
    assert result.returncode == 0, result.stdout[-6000:]
    sys.path.insert(0, str(ROOT / "examples" / "cpp_inference"))
    try:
        from export_model import build_model
    finally:
        sys.path.pop(0)
    package = torch._inductor.aoti_load_package(str(work_dir / "model.pt2"))
    x = torch.load(work_dir / "input.pt")
    torch.testing.assert_close(package(x), torch.load(work_dir / "expected.pt"), rtol=1e-5, atol=1e-5)
    model = build_model()
    x2 = torch.randn(9, *x.shape[1:])  # the package's first dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(package(x2), model(x2), rtol=1e-5, atol=1e-5)
