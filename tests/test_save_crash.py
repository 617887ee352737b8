"""Crash-safe, atomic saves: save_pretrained replaces the adapter directory as a whole, so the path holds the
complete old or the complete new adapter at every instant -- across SIGKILL at random moments, under
concurrent saves to the same path, and with the two-rename fallback used where RENAME_EXCHANGE is missing --
and leftover temporaries of killed saves are removed by the next save and ignored by loads.

The savers are forked children of the test process (no interpreter start per kill), each saving adapters
from a fixed set of versions in a loop; the test process reads the path while they run and after each kill.
~15 s for the 200 + 60 kills on 2 shared cores."""

import os
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import qgoft  # noqa: E402
from qgoft import serialization  # noqa: E402
from qgoft.serialization import CONFIG_NAME, WEIGHTS_NAME, iter_leftovers, read_adapter  # noqa: E402
from tiny_models import Classifier  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

VERSIONS = 3


def _versions():
    """VERSIONS adapted models of one architecture with different adapter values."""
    models = []
    for seed in range(VERSIONS):
        model = qgoft.get_qgoft_model(Classifier(), qgoft.QGoftConfig(target_modules="all-linear",
                                                                       modules_to_save=["classifier"]))
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.3 * torch.randn(param.shape, generator=g))
        models.append(model)
    return models


def _which_version(path, states):
    """The index of the version the adapter at ``path`` holds (asserts it is one of them, complete)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "reading the previous adapter" note
        saved = read_adapter(str(path))
    matches = [i for i, state in enumerate(states)
               if saved.tensors.keys() == state.keys() and all(torch.equal(saved.tensors[k], state[k]) for k in state)]
    assert len(matches) == 1, f"{path} holds no complete written version"
    return matches[0]


def _saver(models, path, first, pipe_w):
    """Child: save versions in turn forever, one byte to the pipe per completed save."""
    try:
        torch.set_num_threads(1)
        i = first
        while True:
            models[i % VERSIONS].save_pretrained(path)
            os.write(pipe_w, b".")
            i += 1
    finally:
        os._exit(0)


def _kill_rounds(tmp_path, rounds, savers, max_delay_s):
    models = _versions()
    states = [{k: v.detach().clone() for k, v in m.get_adapter_state_dict().items()} for m in models]
    path = tmp_path / "adapter"
    models[0].save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")  # a file of the user's beside the adapter: kept by every save
    # Kill delays scale with this machine's save time (a loaded machine saves several times slower), so
    # that the kills keep landing inside running saves rather than before the first one completes.
    started = time.monotonic()
    for i in range(5):
        models[i % VERSIONS].save_pretrained(path)
    max_delay_s = max(max_delay_s, 4 * (time.monotonic() - started) / 5)
    models[0].save_pretrained(path)
    rng = random.Random(1234)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    completed, seen, reads = 0, set(), 0
    for index in range(rounds):
        pids = []
        for _ in range(savers if index % 2 else 1):  # every other round: concurrent savers
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _saver(models, str(path), rng.randrange(VERSIONS), write_fd)
            pids.append(pid)
        deadline = time.monotonic() + rng.uniform(0.0, max_delay_s)
        while time.monotonic() < deadline:  # read while the savers run: always one complete version
            seen.add(_which_version(path, states))
            reads += 1
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.waitpid(pid, 0)
        seen.add(_which_version(path, states))  # and after the kill
        # The user's file is kept too: at the path, or (two-rename fallback killed between its renames) in the
        # complete previous adapter beside it, which loads read and the next save puts back.
        holder = path if path.is_dir() else serialization._previous_copy(str(path))
        assert holder is not None and (Path(holder) / "tokenizer.json").read_text() == "{}"
        try:
            completed += len(os.read(read_fd, 1 << 16))
        except BlockingIOError:
            pass
    os.close(read_fd)
    os.close(write_fd)
    return models, states, path, completed, seen, reads


def _check_cleanup(models, states, path):
    version = _which_version(path, states)  # loads ignore leftovers of killed saves
    models[(version + 1) % VERSIONS].save_pretrained(path)
    assert list(iter_leftovers(path)) == []  # the next save removed them
    assert _which_version(path, states) == (version + 1) % VERSIONS
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json"]
    loaded = qgoft.QGoftModel.from_pretrained(Classifier(), str(path))
    state = loaded.get_adapter_state_dict()
    assert all(torch.equal(state[k], v) for k, v in states[(version + 1) % VERSIONS].items())


def test_sigkill_at_random_moments_leaves_a_complete_adapter(tmp_path):
    """200 rounds of kills, every other one of 2 concurrent savers of one path."""
    assert serialization._RENAMEAT2 is not None or not os.uname().sysname == "Linux"
    models, states, path, completed, seen, reads = _kill_rounds(tmp_path, rounds=200, savers=2, max_delay_s=0.06)
    # The kills hit running saves (not a vacuous pass): many saves completed between them, every version
    # was seen, and reads ran concurrently with the saves.
    assert completed >= 50 and seen == set(range(VERSIONS)) and reads >= 200, (completed, seen, reads)
    _check_cleanup(models, states, path)


def test_sigkill_with_the_two_rename_fallback(tmp_path, monkeypatch):
    """Where RENAME_EXCHANGE is missing: a kill between the two renames leaves the old adapter beside the
    path; loads read it, the next save puts it back."""
    monkeypatch.setattr(serialization, "_RENAMEAT2", None)
    models, states, path, completed, seen, reads = _kill_rounds(tmp_path, rounds=60, savers=2, max_delay_s=0.08)
    assert completed >= 10 and len(seen) >= 2, (completed, seen)
    _check_cleanup(models, states, path)


def test_interrupted_fallback_swap_is_restored(tmp_path, monkeypatch):
    """Deterministic version of the fallback's crash window: killed after renaming the old adapter away."""
    monkeypatch.setattr(serialization, "_RENAMEAT2", None)
    models = _versions()
    states = [{k: v.detach().clone() for k, v in m.get_adapter_state_dict().items()} for m in models]
    path = tmp_path / "adapter"
    models[0].save_pretrained(path)
    real_rename = os.rename

    def crash_after_first_rename(src, dst):
        real_rename(src, dst)
        if ".qgoft-old-" in str(dst):
            raise KeyboardInterrupt  # stands for the kill: nothing after this runs

    monkeypatch.setattr(os, "rename", crash_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        models[1].save_pretrained(path)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not path.exists()
    with pytest.warns(UserWarning, match="interrupted"):
        saved = read_adapter(str(path))
    assert all(torch.equal(saved.tensors[k], v) for k, v in states[0].items())
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = qgoft.QGoftModel.from_pretrained(Classifier(), str(path))
    assert all(torch.equal(loaded.get_adapter_state_dict()[k], v) for k, v in states[0].items())
    models[2].save_pretrained(path)
    assert _which_version(path, states) == 2 and list(iter_leftovers(path)) == []


def test_save_keeps_the_users_other_files_and_permissions(tmp_path):
    models = _versions()
    path = tmp_path / "out"
    (path / "checkpoint-5" / "nested").mkdir(parents=True)
    (path / "checkpoint-5" / "nested" / "optimizer.pt").write_bytes(b"x" * 100)
    (path / "README.md").write_text("card")
    os.symlink("README.md", path / "link.md")
    (path / "adapter_model.safetensors.tmp").write_bytes(b"partial")  # left by qgoft before format 2
    os.chmod(path, 0o750)
    models[0].save_pretrained(path)
    models[1].save_pretrained(path)
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md", "checkpoint-5", "link.md"])
    assert (path / "checkpoint-5" / "nested" / "optimizer.pt").read_bytes() == b"x" * 100
    assert os.readlink(path / "link.md") == "README.md" and (path / "link.md").read_text() == "card"
    assert os.stat(path).st_mode & 0o777 == 0o750
    assert list(iter_leftovers(path)) == []


def test_save_through_a_symlinked_directory_keeps_the_link(tmp_path):
    models = _versions()
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    models[0].save_pretrained(tmp_path / "link")
    models[1].save_pretrained(tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and sorted(os.listdir(tmp_path / "real")) == [CONFIG_NAME, WEIGHTS_NAME]


def test_live_savers_temporaries_are_left_alone(tmp_path):
    """A staging directory locked by a live save is not removed by another save's cleanup."""
    import fcntl

    models = _versions()
    path = tmp_path / "adapter"
    models[0].save_pretrained(path)
    staging = serialization._sibling(str(tmp_path), "adapter", "tmp")
    os.mkdir(staging)
    fd = os.open(staging, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        models[1].save_pretrained(path)
        assert os.path.isdir(staging)
    finally:
        os.close(fd)
    os.utime(staging, (0, 0))  # old and unlocked: removed next time
    models[2].save_pretrained(path)
    assert not os.path.exists(staging)


def test_directory_that_cannot_be_swapped_is_written_file_by_file(tmp_path, monkeypatch):
    """A mount point (or a directory whose parent is read-only) cannot be replaced: the files are replaced
    one by one, with a warning that this save is not atomic."""
    models = _versions()
    states = [{k: v.detach().clone() for k, v in m.get_adapter_state_dict().items()} for m in models]
    path = tmp_path / "mnt"
    models[0].save_pretrained(path)
    (path / "other.txt").write_text("kept")
    monkeypatch.setattr(serialization.os.path, "ismount", lambda p: os.fspath(p) == str(path))
    with pytest.warns(UserWarning, match="one by one"):
        models[1].save_pretrained(path)
    assert _which_version(path, states) == 1
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "other.txt"])


def test_saving_into_the_working_directory_follows_it(tmp_path, monkeypatch):
    models = _versions()
    (tmp_path / "work" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "sub")
    models[0].save_pretrained(str(tmp_path / "work"))
    assert os.getcwd() == str((tmp_path / "work" / "sub").resolve())  # not a deleted directory
    assert os.path.isfile(os.path.join("..", CONFIG_NAME))
    monkeypatch.chdir(tmp_path / "work")
    models[1].save_pretrained(".")
    assert os.path.isfile(CONFIG_NAME) and os.path.isdir("sub")
