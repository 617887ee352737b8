"""Shared pytest configuration of the qgoft test suite.

* The report header shows ``qgoft.build_info()`` (what is compiled, which CPU kernel variant is selected).
* If the compiled extension is not loaded, the session FAILS unless ``QGOFT_ALLOW_FALLBACK=1``: CI must
  never silently test only the pure-PyTorch fallback.
* Fixtures: ``cpu_isa`` (parametrized over every CPU kernel variant, skipping the ones this machine or
  build lacks, restoring the selection afterwards), ``tile_rows`` (of that variant), ``num_threads`` (set
  and restore torch's thread count) and ``one_thread``.
"""
from __future__ import annotations

import os

import pytest
import torch

import qgoft

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


def pytest_sessionstart(session):
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


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Select one CPU kernel variant for the test (skipped if not compiled or not supported); restores."""
    if not qgoft.extension_loaded():
        pytest.skip("compiled extension not loaded")
    c_module = qgoft._extension._C
    name = request.param
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


@pytest.fixture
def tile_rows(cpu_isa):
    """Rows per tile of the CPU kernel variant selected by ``cpu_isa``."""
    return int(qgoft._extension._C.build_info()["cpu_tile_rows"])


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
