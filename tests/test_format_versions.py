"""Adapters of every earlier format version load (through an explicit migration with a warning) and give the
outputs recorded when they were written; a newer version is refused naming both versions. The fixtures under
tests/fixtures/ were written by the old qgoft versions themselves (tests/fixtures/README.md)."""

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import qgoft  # noqa: E402
from qgoft.serialization import (CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError,  # noqa: E402
                                 FormatMigrationWarning, read_adapter)
from tiny_models import Classifier, assert_same_snapshot, snapshot, token_batch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# name -> (format version, whether it has tensor checksums), read from the fixture itself.
ALL = {path.name: (json.loads((path / CONFIG_NAME).read_text())["format_version"],
                   "tensor_sha256" in json.loads((path / CONFIG_NAME).read_text()))
       for path in sorted(FIXTURES.iterdir()) if (path / CONFIG_NAME).is_file()}
EARLIER = {name: info for name, info in ALL.items() if info[0] < qgoft.FORMAT_VERSION}
CURRENT = [name for name, info in ALL.items() if info[0] == qgoft.FORMAT_VERSION]


def _record(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def test_every_format_has_a_fixture():
    assert {version for version, _ in ALL.values()} == set(range(1, qgoft.FORMAT_VERSION + 1))
    assert {name for name, (_, checksums) in EARLIER.items() if not checksums}  # the format without checksums


@pytest.mark.parametrize("name", CURRENT)
def test_current_format_fixture_loads_without_a_warning(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = qgoft.QGoftModel.from_pretrained(Classifier(), str(FIXTURES / name))
    assert torch.equal(model(*token_batch()), torch.tensor(_record(name)["logits"]))


@pytest.mark.parametrize("name", sorted(EARLIER))
def test_earlier_format_loads_with_a_migration_warning(name):
    version, has_checksums = EARLIER[name]
    record = _record(name)
    with pytest.warns(FormatMigrationWarning, match=f"format version {version} .* migrated to format version "
                                                    f"{qgoft.FORMAT_VERSION}"):
        model = qgoft.QGoftModel.from_pretrained(Classifier(), str(FIXTURES / name))
    assert model.qgoft_config.format_version == qgoft.FORMAT_VERSION
    expected = torch.tensor(record["logits"], dtype=torch.float32)
    assert torch.equal(model(*token_batch()), expected)
    with pytest.warns(FormatMigrationWarning, match="no tensor checksums" if not has_checksums else "verified"):
        saved = read_adapter(str(FIXTURES / name))
    assert (saved.checksums is not None) == has_checksums and saved.format_version == version
    assert {k: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, t in saved.tensors.items()} == record["tensor_sha256"]


@pytest.mark.parametrize("name", sorted(EARLIER))
def test_saving_a_migrated_adapter_writes_the_current_format(tmp_path, name):
    with pytest.warns(FormatMigrationWarning):
        model = qgoft.QGoftModel.from_pretrained(Classifier(), str(FIXTURES / name))
    model.save_pretrained(tmp_path / "again")
    meta = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    assert meta["format_version"] == qgoft.FORMAT_VERSION and "tensor_sha256" in meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current format loads without a warning
        again = qgoft.QGoftModel.from_pretrained(Classifier(), str(tmp_path / "again"))
    assert torch.equal(again(*token_batch()), torch.tensor(_record(name)["logits"]))


def test_earlier_format_with_checksums_still_verifies_them(tmp_path):
    assert EARLIER["format1_checksums"] == (1, True)
    directory = tmp_path / "a"
    shutil.copytree(FIXTURES / "format1_checksums", directory)
    raw = bytearray((directory / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0x10  # inside the last tensor's data
    (directory / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.warns(FormatMigrationWarning), pytest.raises(AdapterFormatError, match="SHA-256"):
        qgoft.QGoftModel.from_pretrained(Classifier(), str(directory))


@pytest.mark.parametrize("version", [qgoft.FORMAT_VERSION + 1, 99])
def test_newer_format_is_refused_naming_both_versions(tmp_path, version):
    directory = tmp_path / "a"
    shutil.copytree(FIXTURES / "format1_checksums", directory)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta["format_version"] = version
    meta["qgoft_version"] = "9.9.9"
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    base = Classifier()
    before = snapshot(base)
    with pytest.raises(AdapterFormatError, match=rf"format version {version} is not supported: this qgoft reads "
                                                 rf"format versions 1 to {qgoft.FORMAT_VERSION}.*qgoft 9\.9\.9"):
        qgoft.QGoftModel.from_pretrained(base, str(directory))
    assert_same_snapshot(before, snapshot(base))


@pytest.mark.parametrize("version", [0, -1, "2", 1.0, None, True])
def test_invalid_versions_are_refused(tmp_path, version):
    directory = tmp_path / "a"
    shutil.copytree(FIXTURES / "format1_checksums", directory)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta["format_version"] = version
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match="format version .* is not supported"):
        read_adapter(str(directory))


def test_current_format_without_checksums_is_refused(tmp_path):
    """Only format-1 files may lack checksums (they predate them); a current file without them was tampered."""
    model = qgoft.get_qgoft_model(Classifier(), qgoft.QGoftConfig(target_modules=["query"]))
    model.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    del meta["tensor_sha256"]
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match="'tensor_sha256' .* is missing"):
        read_adapter(str(tmp_path / "a"))
