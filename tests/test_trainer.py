"""QGoftTrainer (qgoft.integrations.transformers): the regulariser in the Trainer's loss, adapter-only
checkpoints, resume_from_checkpoint equal to an uninterrupted run, `accelerate launch` with 2 CPU processes."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import transformers  # noqa: E402

import qgoft  # noqa: E402
from qgoft.integrations.transformers import QGoftTrainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_with_trainer.py")
sys.path.insert(0, os.path.join(ROOT, "examples"))
from train_with_trainer import synthetic_dataset, tiny_bert_classifier  # noqa: E402


def qgoft_model(seed: int = 0, weight: float = 0.5) -> qgoft.QGoftModel:
    config = qgoft.QGoftConfig(method="qgoft", target_modules=["query", "value", "dense"],
                               modules_to_save=["classifier"], orthogonality_weight=weight)
    return qgoft.get_qgoft_model(tiny_bert_classifier(seed), config)


def arguments(tmp_path, **changes) -> transformers.TrainingArguments:
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=20,
                  save_steps=10, logging_steps=5, seed=0, data_seed=0, report_to=[], use_cpu=True,
                  dataloader_num_workers=0, disable_tqdm=True)
    values.update(changes)
    return transformers.TrainingArguments(**values)


def trained_state(model: qgoft.QGoftModel) -> dict:
    return {k: v.clone() for k, v in model.get_adapter_state_dict().items()}


class StopAt(transformers.TrainerCallback):
    """Interrupts training after the given step (after its checkpoint was written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_penalty_enters_the_loss_and_checkpoints_hold_the_adapter_only(tmp_path):
    model = qgoft_model()
    data = synthetic_dataset(32)
    trainer = QGoftTrainer(model=model, args=arguments(tmp_path, max_steps=10), train_dataset=data)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    with torch.no_grad():
        for block in model.adapter_parameters():
            block.add_(0.3 * torch.randn(block.shape, generator=torch.Generator().manual_seed(1)))
    task = model(**batch).loss
    penalty = model.orthogonality_penalty()
    assert penalty > 0
    torch.testing.assert_close(trainer.compute_loss(model, batch), task + penalty)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["orthogonality_penalty"] > 0 for entry in logged)
    checkpoint = os.path.join(str(tmp_path), "checkpoint-10")
    files = sorted(os.listdir(checkpoint))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not [f for f in files if f.startswith(("model.", "pytorch_model"))], files
    reloaded = qgoft.QGoftModel.from_pretrained(tiny_bert_classifier(0), checkpoint)
    for key, value in model.get_adapter_state_dict().items():
        assert torch.equal(reloaded.get_adapter_state_dict()[key], value)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    data = synthetic_dataset(48)
    straight = qgoft_model()
    QGoftTrainer(model=straight, args=arguments(tmp_path / "straight"), train_dataset=data).train()

    first = qgoft_model()
    QGoftTrainer(model=first, args=arguments(tmp_path / "split"), train_dataset=data,
                 callbacks=[StopAt(10)]).train()
    assert not os.path.exists(tmp_path / "split" / "checkpoint-20")
    resumed = qgoft_model()  # a fresh process would build the same model from scratch
    trainer = QGoftTrainer(model=resumed, args=arguments(tmp_path / "split"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-10"))
    assert trainer.state.global_step == 20
    want, got = trained_state(straight), trained_state(resumed)
    assert want.keys() == got.keys()
    moved = max((want[k] - trained_state(qgoft_model())[k]).abs().max().item() for k in want)
    assert moved > 1e-2  # training changed the parameters
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_refuses_a_checkpoint_of_another_adapter_and_changes_nothing(tmp_path):
    data = synthetic_dataset(16)
    QGoftTrainer(model=qgoft_model(), args=arguments(tmp_path, max_steps=2, save_steps=2),
                 train_dataset=data).train()
    other = qgoft.get_qgoft_model(tiny_bert_classifier(0), qgoft.QGoftConfig(
        method="goft", target_modules=["query", "value", "dense"], modules_to_save=["classifier"]))
    before = trained_state(other)
    trainer = QGoftTrainer(model=other, args=arguments(tmp_path / "other", max_steps=4), train_dataset=data)
    with pytest.raises(ValueError, match="method"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    after = trained_state(other)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_named_adapters_are_checkpointed_in_their_folders_and_resumed(tmp_path):
    data = synthetic_dataset(16)

    def two_adapters(seed: int) -> qgoft.QGoftModel:
        model = qgoft_model()
        with torch.no_grad():  # the inactive "default" adapter: different in each model, restored by resume
            for block in model.adapter_parameters():
                block.add_(0.1 * torch.randn(block.shape, generator=torch.Generator().manual_seed(seed)))
        model.add_adapter("task", qgoft.QGoftConfig(method="goft", target_modules=["query", "value", "dense"],
                                                    modules_to_save=["classifier"]))
        model.set_adapter("task")
        return model

    first = two_adapters(1)
    QGoftTrainer(model=first, args=arguments(tmp_path, max_steps=2, save_steps=2), train_dataset=data).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "task" / "adapter_config.json").is_file()
    resumed = two_adapters(2)
    def default_blocks(model: qgoft.QGoftModel) -> torch.Tensor:
        return model.base_model.bert.encoder.layer[0].attention.self.query.qgoft_adapters["default"].givens_blocks

    assert not torch.equal(default_blocks(first), default_blocks(resumed))
    QGoftTrainer(model=resumed, args=arguments(tmp_path, max_steps=2, save_steps=2),
                 train_dataset=data).train(resume_from_checkpoint=str(checkpoint))
    assert resumed.active_adapter == "task"
    for name in ("task", "default"):
        first.set_adapter(name)
        resumed.set_adapter(name)
        want, got = trained_state(first), trained_state(resumed)
        assert all(torch.equal(want[k], got[k]) for k in want), name


def test_trainer_refuses_a_model_without_qgoft_adapters(tmp_path):
    with pytest.raises(TypeError, match="QGoftModel"):
        QGoftTrainer(model=tiny_bert_classifier(0), args=arguments(tmp_path), train_dataset=synthetic_dataset(4))


def test_accelerate_launch_two_cpu_processes_trains_and_saves_once(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # --multi_gpu picks accelerate's torchrun launcher; the script's use_cpu=True makes it DDP over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", EXAMPLE,
               "--tiny", "--max-steps", "6", "--output-dir", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("qgoft adapter saved to") == 1, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 6 and summary["eval_accuracy"] is not None
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not glob.glob(str(out / "**" / "model.safetensors"), recursive=True)
    reloaded = qgoft.QGoftModel.from_pretrained(tiny_bert_classifier(0), str(out / "adapter"))
    assert summary["adapter_checksum"] == pytest.approx(
        sum(float(p.double().sum()) for p in reloaded.adapter_parameters()), rel=1e-9)
