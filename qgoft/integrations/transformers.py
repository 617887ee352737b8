"""The Hugging Face Trainer with qGOFT: :class:`QGoftTrainer` (needs ``transformers``; ``import qgoft`` does not).

    from qgoft.integrations.transformers import QGoftTrainer

    model = qgoft.get_qgoft_model(BertForSequenceClassification.from_pretrained(path), config)
    trainer = QGoftTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

What it changes against ``transformers.Trainer`` (nothing else; ``accelerate launch`` / DDP work unchanged):

* the loss is ``task loss + model.orthogonality_penalty()`` (``lambda sum <alpha, beta>^2``, the qGOFT
  regulariser), counted once per optimizer step under gradient accumulation; the penalty's mean over the
  logging interval is logged as ``orthogonality_penalty``;
* ``save_model`` and every checkpoint write the adapter only (``QGoftModel.save_pretrained``:
  ``adapter_config.json`` + ``adapter_model.safetensors``, adapter parameters and modules to save), never
  the base weights; the Trainer adds its own optimizer / scheduler / RNG state files to checkpoints as usual;
* ``resume_from_checkpoint`` and ``load_best_model_at_end`` load those adapter files back into the model,
  every named adapter from its folder (each validated before it changes, like ``QGoftModel.load_adapter``);
* columns, label names and loss keyword arguments are read from the base model's ``forward`` (the wrapper's
  ``forward(*args, **kwargs)`` says nothing about them).

DeepSpeed and FSDP checkpointing go through their own engines and are not handled here.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, Optional

import torch
import transformers
from torch import nn

from ..model import QGoftModel

__all__ = ["QGoftTrainer", "find_qgoft_model"]

logger = logging.getLogger(__name__)


def find_qgoft_model(model: nn.Module) -> QGoftModel:
    """The :class:`QGoftModel` inside ``model`` (itself, or wrapped by DDP / accelerate / torch.compile)."""
    seen = 0
    while not isinstance(model, QGoftModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or seen > 8:
            raise TypeError(f"QGoftTrainer needs a qgoft.QGoftModel (qgoft.get_qgoft_model(model, config)), got "
                            f"{type(model).__name__}")
        model, seen = inner, seen + 1
    return model


class QGoftTrainer(transformers.Trainer):
    """``transformers.Trainer`` for a :class:`qgoft.QGoftModel`: regulariser in the loss, adapter-only
    checkpoints, resuming from them. Takes exactly the Trainer's arguments."""

    def __init__(self, model: Optional[nn.Module] = None, *args: Any, **kwargs: Any) -> None:
        self._qgoft_model = find_qgoft_model(model) if model is not None else None
        super().__init__(model, *args, **kwargs)
        if self._qgoft_model is None:
            raise TypeError("QGoftTrainer needs model=<a qgoft.QGoftModel>")
        base = self._qgoft_model.base_model
        if hasattr(base, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = bool(base.accepts_loss_kwargs)
        else:
            parameters = inspect.signature(base.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
        if self.args.label_names is None:
            self.label_names = transformers.utils.find_labels(type(base))
        self.can_return_loss = transformers.utils.can_return_loss(type(base))
        self._penalty_sum = 0.0
        self._penalty_count = 0

    # ------------------------------------------------------------------------------------------------
    # Loss.
    # ------------------------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result  # evaluation reports the task loss
        loss, outputs = result if return_outputs else (result, None)
        penalty = self._qgoft_model.orthogonality_penalty()
        self._penalty_sum += float(penalty.detach())
        self._penalty_count += 1
        if self._loss_is_scaled_for_accumulation(num_items_in_batch):
            # The Trainer will not divide this loss by the accumulation steps: add the penalty's share.
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """The Trainer's own rule (``training_step``) for whether it divides the loss by the number of
        gradient accumulation steps (False) or the loss already is normalized over them (True)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._penalty_count and "loss" in logs:
            logs["orthogonality_penalty"] = self._penalty_sum / self._penalty_count
            self._penalty_sum, self._penalty_count = 0.0, 0
        super().log(logs, *args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            names = list(inspect.signature(self._qgoft_model.base_model.forward).parameters)
            self._signature_columns = names + sorted({"label", "label_ids", *self.label_names})

    # ------------------------------------------------------------------------------------------------
    # Adapter-only checkpoints.
    # ------------------------------------------------------------------------------------------------

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Write the adapter (not the base model) to ``output_dir`` from the main process. With FSDP2-sharded
        adapters the save gathers them (a collective): every rank takes part and the main process writes."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            if self._qgoft_model.adapters_sharded():
                self._qgoft_model.save_pretrained(output_dir)  # gathers; rank 0 writes, this rank waits
            return
        self._qgoft_model.save_pretrained(output_dir)
        logger.info("qgoft adapter saved to %s (process %d)", output_dir, self.args.process_index)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        target = find_qgoft_model(model) if model is not None else self._qgoft_model
        logger.info("loading the qgoft adapters of checkpoint %s", resume_from_checkpoint)
        _load_adapters(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        logger.info("loading the best qgoft adapters from %s (score %s)", checkpoint, self.state.best_metric)
        _load_adapters(self._qgoft_model, checkpoint)


def _load_adapters(model: QGoftModel, checkpoint: str) -> None:
    """Load every adapter of ``model`` from where ``save_pretrained`` put it in ``checkpoint`` (the default
    one at the top level, the others in their subfolders); the active one stays active and trainable."""
    for name in model.adapter_names():
        directory = model.adapter_save_directory(checkpoint, name)
        if name == model.active_adapter:
            model.load_adapter(directory, is_trainable=True)
        else:
            model.load_adapter(directory, adapter_name=name)
