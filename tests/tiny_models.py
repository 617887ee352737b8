"""Small models built locally for the model-level tests (tiny BERT / GPT-2 from configs, no downloads) and
the snapshot helpers that define "the model is unchanged". Imported by tests/test_model.py and
tests/test_serialization.py (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import transformers  # noqa: E402  (callers importorskip it first)

VOCAB = 40


def tiny_bert(seed: int = 0, hidden: int = 16, layers: int = 2) -> nn.Module:
    """BertModel without pooler, dropout off, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=2 * hidden,
                                     max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def tiny_gpt2(seed: int = 0, lm_head: bool = False) -> nn.Module:
    """GPT2Model (or GPT2LMHeadModel) with Conv1D projections, dropout off, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    cls = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model
    return cls(config).eval()


class Classifier(nn.Module):
    """Tiny BERT encoder + mean pooling + linear head (the shape of the sentiment example)."""

    def __init__(self, seed: int = 0, hidden: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.encoder = tiny_bert(seed, hidden, layers)
        torch.manual_seed(seed + 1)
        self.classifier = nn.Linear(hidden, 2)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1))


def token_batch(seed: int = 0, batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with padding at the end of the first sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return ids, mask


def _plain_parts(tensor: torch.Tensor) -> tuple:
    """Copies of the plain tensors a tensor is made of (the inner tensors of a quantized tensor subclass)."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return (tensor.detach().clone(),)
    names, _ = tensor.__tensor_flatten__()
    return tuple(part for name in names for part in _plain_parts(getattr(tensor, name)))


def snapshot(model: nn.Module) -> dict:
    """Everything that 'unchanged' means: module types per path, state values (the inner tensors of quantized
    weights), requires_grad, training."""
    return {
        "types": {name: type(m) for name, m in model.named_modules()},
        "state": {k: _plain_parts(v) for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["types"] == after["types"]
    assert before["grad"] == after["grad"]
    assert before["training"] == after["training"]
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert len(before["state"][key]) == len(after["state"][key]), key
        assert all(torch.equal(a, b) for a, b in zip(before["state"][key], after["state"][key])), key
