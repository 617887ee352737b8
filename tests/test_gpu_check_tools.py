"""The GPU check's scripts without a GPU (tools/gpu_check.sh runs on a lent GPU machine with minutes of
device time: a slip in them must show here first): shell syntax, every Python part compiles, the sanitizer
case list covers every path in every kernel variant, and the targets summary judges met / missed / not run
from the files the check writes."""
import json
import os
import py_compile
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["bench/bench_gpu.py", "tools/gpu_sanitize_case.py", "tools/gpu_check_summary.py",
           "tools/cuda_resource_report.py", "tools/gpu_variant_check.py"]


def test_shell_syntax():
    for script in ("tools/gpu_check.sh", "tools/gpu_debug.sh"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_python_parts_compile(script, tmp_path):
    py_compile.compile(os.path.join(ROOT, script), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_sanitizer_cases_cover_every_variant():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools/gpu_sanitize_case.py"), "--list"],
                         check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}).stdout
    lines = out.splitlines()
    assert lines[-1] == f"{len(lines) - 1} cases"
    for variant in ("base", "table", "reg"):
        for path in ("R>1 row slots", "512 threads", "scalar loads", "segmented 256", "segmented default"):
            for dtype in ("float32", "bfloat16", "float16"):
                assert any(line.startswith(f"{path} [{variant}]") and dtype in line for line in lines), (path, variant, dtype)
    assert any(line.startswith("general global") for line in lines)


def summarize(tmp_path, parts, targets):
    (tmp_path / "parts.tsv").write_text("".join("\t".join(p) + "\n" for p in parts))
    (tmp_path / "bench_gpu.json").write_text(json.dumps({"header": {"device": "NVIDIA H100"}, "targets": targets}))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools/gpu_check_summary.py"), str(tmp_path)], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
    return {t["target"]: t for t in json.loads((tmp_path / "targets.json").read_text())["targets"]}


def test_summary_verdicts(tmp_path):
    def t(target, variant, met, what="case"):
        return {"target": target, "what": f"{what}: x", "variant": variant, "met": met, "measured": "1.0x"}

    targets = [t(1, "base", False, "a"), t(1, "base", True, "b"), t(1, "table", True, "a"), t(1, "table", True, "b"),
               t(2, "base", False), t(2, "table", False), t(3, "base", True), t(3, "table", None)]
    parts = [("tests", "PASS", "60", "900 passed"), ("sanitize", "FAIL", "100", "racecheck: 2 hazards")]
    res = summarize(tmp_path, parts, targets)
    assert res[1]["met"] is True and "variant table" in res[1]["measured"]
    assert res[2]["met"] is False
    assert res[3]["met"] is True and "variant base" in res[3]["measured"]
    assert res[4]["met"] is None  # no Linear rows
    assert res[5]["met"] is None  # the model part wrote nothing
    assert res[6]["met"] is False and "racecheck" in res[6]["measured"]
    assert res[7]["met"] is True
    assert (tmp_path / "targets.md").read_text().count("| MISSED |") == 2
