"""Shared pytest configuration of the qgoft test suite.

* The report header shows ``qgoft.build_info()`` (what is compiled, which CPU kernel variant is selected).
* If the compiled extension is not loaded, the session FAILS unless ``QGOFT_ALLOW_FALLBACK=1``: CI must
  never silently test only the pure-PyTorch fallback.
* Device fixtures of the op tests (tests/test_ops.py, test_bad_input.py, test_determinism.py, test_fuzz.py):
  ``device`` is ``"cpu"`` and ``"cuda"``; ``backend`` is every CPU kernel variant (``generic``, ``avx2``,
  ``avx512``; the device is ``"cpu"``) and ``"cuda"``. The CUDA ones skip without a GPU or without qgoft's CUDA
  kernels, and fail instead under ``QGOFT_REQUIRE_CUDA=1`` (the GPU check script sets it).
* Fixtures: ``cpu_isa`` (parametrized over every CPU kernel variant, skipping the ones this machine or
  build lacks, restoring the selection afterwards), ``tile_rows(d, dtype)`` (of that variant),
  ``num_threads`` (set and restore torch's thread count) and ``one_thread``.
"""
from __future__ import annotations

import os

import pytest
import torch

import qgoft
from chain_helpers import require_cuda_or_skip

CPU_ISAS = ("generic", "avx2", "avx512")


def _fallback_allowed() -> bool:
    return os.environ.get("QGOFT_ALLOW_FALLBACK", "0") == "1"


def pytest_report_header(config):
    info = qgoft.build_info()
    lines = [f"qgoft build_info: {info}"]
    if not info.get("extension_loaded"):
        lines.append("qgoft: compiled extension NOT loaded -> "
                     + ("testing the pure-PyTorch fallback only (QGOFT_ALLOW_FALLBACK=1)"
                        if _fallback_allowed() else "session will fail (set QGOFT_ALLOW_FALLBACK=1 to allow)"))
    return lines


def _check_sanitizer_build() -> None:
    """``QGOFT_SANITIZER=1`` (set by tools/check_sanitizers.sh): the session must run the ASan + UBSan build
    of the extension with the sanitizer runtimes loaded, not some other qgoft found on the path."""
    lib = qgoft.ops_library_path()
    problems = []
    if not qgoft.extension_loaded():
        problems.append(f"extension not loaded ({qgoft._extension.extension_error()})")
    elif b"__asan_init" not in lib.read_bytes() or b"__ubsan_handle" not in lib.read_bytes():
        problems.append(f"{lib} is not instrumented with ASan + UBSan")
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    if "libasan" not in maps or "libubsan" not in maps:
        problems.append("the ASan / UBSan runtimes are not loaded (LD_PRELOAD)")
    if problems:
        pytest.exit("QGOFT_SANITIZER=1 but " + "; ".join(problems), returncode=1)


def pytest_sessionstart(session):
    if os.environ.get("QGOFT_SANITIZER", "0") == "1":
        _check_sanitizer_build()
    if qgoft.extension_loaded() or _fallback_allowed():
        return
    reason = qgoft._extension.extension_error()
    pytest.exit(
        f"qgoft's compiled extension is not loaded ({reason}); refusing to test only the pure-PyTorch "
        "fallback. Build it (pip install --no-build-isolation -e .) or set QGOFT_ALLOW_FALLBACK=1.",
        returncode=1,
    )


def _selected_isa() -> str:
    return qgoft._extension._C.build_info()["cpu_isa_selected"]


def _select_cpu_isa(name: str):
    """Select the CPU kernel variant ``name`` (skip if not compiled or not supported); a generator that restores
    the previous selection when resumed."""
    if not qgoft.extension_loaded():
        pytest.skip("compiled extension not loaded")
    c_module = qgoft._extension._C
    before = _selected_isa()
    if not c_module.set_cpu_isa(name):
        info = c_module.build_info()
        pytest.skip(f"CPU ISA {name!r} unavailable here (compiled {info['cpu_isas_compiled']}, "
                    f"supported {info['cpu_isas_supported']})")
    try:
        assert _selected_isa() == name
        yield name
    finally:
        assert c_module.set_cpu_isa(before)
        assert _selected_isa() == before


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Select one CPU kernel variant for the test (skipped if not compiled or not supported); restores."""
    yield from _select_cpu_isa(request.param)


@pytest.fixture(params=("cpu", "cuda"))
def device(request):
    """The device an op test runs on: ``"cpu"``, and ``"cuda"`` where the CUDA kernels can be tested."""
    if request.param == "cuda":
        require_cuda_or_skip()
    return request.param


@pytest.fixture(params=CPU_ISAS + ("cuda",))
def backend(request):
    """The compiled kernels an op test runs: one CPU kernel variant (selected for the test, restored
    afterwards; ids ``generic``, ``avx2``, ``avx512`` as for ``cpu_isa``) or the CUDA kernels. Yields the
    device, ``"cpu"`` or ``"cuda"``."""
    if request.param == "cuda":
        require_cuda_or_skip()
        yield "cuda"
        return
    for _ in _select_cpu_isa(request.param):
        yield "cpu"


@pytest.fixture
def tile_rows(cpu_isa):
    """``tile_rows(d, dtype="float32")``: rows per tile of the CPU kernel variant selected by ``cpu_isa``."""
    def rows_per_tile(d: int, dtype: str = "float32") -> int:
        return int(qgoft._extension._C.cpu_tile_rows(dtype, d))
    return rows_per_tile


@pytest.fixture
def num_threads():
    """Call with an int to set torch's intra-op thread count for the test; restored afterwards."""
    previous = torch.get_num_threads()

    def set_threads(n: int) -> None:
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n

    yield set_threads
    torch.set_num_threads(previous)


@pytest.fixture
def one_thread(num_threads):
    """Big float64 matmuls gain nothing from a second (shared, noisy) core."""
    num_threads(1)
