"""Hostile adapter files: whatever the bytes of adapter_config.json and of the safetensors header say, loading
gives a correct load or a clear qgoft error (AdapterFormatError), never another exception, a crash, a hang,
an executed payload, a change to the model or an allocation beyond a small bound. Specific attacks first,
then a hypothesis fuzz test that mutates real saved adapters (header bytes, header fields, config values,
config bytes) with the Python allocations of every load measured by tracemalloc (the tensor data a load
allocates is bounded by the bytes it reads, which tracemalloc sees)."""

import json
import os
import signal
import struct
import tracemalloc
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qgoft  # noqa: E402
from qgoft import serialization  # noqa: E402
from qgoft.serialization import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError, read_adapter  # noqa: E402
from tiny_models import Classifier, assert_same_snapshot, snapshot  # noqa: E402

QKEY = "encoder.encoder.layer.0.attention.self.query.givens_blocks"
QLAYER = "encoder.encoder.layer.0.attention.self.query"
EMB = "encoder.embeddings.word_embeddings"
EMBKEY = EMB + ".givens_blocks"
PEAK_BYTES = 1024 * 1024  # Python allocations of one load of this 13 KB adapter (a normal load: 35 KB)


def _model(seed=1):
    model = qgoft.get_qgoft_model(Classifier(), qgoft.QGoftConfig(target_modules="all-linear",
                                                                   modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(config bytes, weights bytes, adapter state) of a real saved adapter."""
    directory = tmp_path_factory.mktemp("orig") / "adapter"
    model = _model()
    model.save_pretrained(directory)
    state = {k: v.detach().clone() for k, v in model.get_adapter_state_dict().items()}
    return (directory / CONFIG_NAME).read_bytes(), (directory / WEIGHTS_NAME).read_bytes(), state


@pytest.fixture(scope="module")
def target():
    """An adapted model to load into (its snapshot must survive every refused load)."""
    model = _model(seed=5)
    return model, snapshot(model)


def _write(directory, config, weights):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_bytes(config)
    (directory / WEIGHTS_NAME).write_bytes(weights)
    return directory


def _split(weights):
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8:8 + length]), weights[8 + length:]


def _join(header, data, raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


@contextmanager
def _time_limit(seconds):
    def expire(signum, frame):
        raise TimeoutError(f"load took more than {seconds} s (a hang)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _load(directory, model, before, state):
    """Load with a time limit and measured Python allocations; returns the error message or None."""
    tracemalloc.start()
    try:
        with _time_limit(20):
            model.load_adapter(str(directory))
    except AdapterFormatError as err:
        message = str(err)
    else:
        message = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"a load allocated {peak} bytes"
    if message is None:  # a correct load: exactly the saved tensors
        loaded = model.get_adapter_state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    else:
        assert_same_snapshot(before, snapshot(model))
    return message


# ------------------------------------------------------------------------------------------------
# Specific attacks.
# ------------------------------------------------------------------------------------------------

def _edit_config(config_bytes, edit):
    data = json.loads(config_bytes)
    edit(data)
    return json.dumps(data).encode()


def _deep(depth):
    return ("[" * depth + "]" * depth).encode()


ATTACKS = {
    # header
    "huge shape": (None, lambda h: h[QKEY].update(shape=[2 ** 40, 2, 2]), "do not fit shape"),
    "huge shape and offsets": (None, lambda h: h[QKEY].update(shape=[2 ** 40, 2, 2], data_offsets=[0, 2 ** 44]),
                               "truncated file"),
    "huge offsets": (None, lambda h: h[QKEY].update(data_offsets=[2 ** 62, 2 ** 62 + 240]), "truncated file"),
    "negative offset": (None, lambda h: h[QKEY].update(data_offsets=[-240, 0]), "do not fit shape"),
    "overlapping offsets": (None, lambda h: h[QKEY].update(
        data_offsets=h[QKEY.replace("query", "key")]["data_offsets"]), "overlaps or has gaps"),
    "float offsets": (None, lambda h: h[QKEY].update(data_offsets=[0.0, 240.0]), "bad data_offsets"),
    "shape of 100 dims": (None, lambda h: h[QKEY].update(shape=[1] * 100), "bad shape"),
    "base weight in header": (None, lambda h: h.update({QLAYER + ".weight": h.pop(QKEY)}), "missing tensors"),
    "path escape in header": (None, lambda h: h.update({"../../etc/passwd": h.pop(QKEY)}), "missing tensors"),
    "metadata not strings": (None, lambda h: h.update(__metadata__=[1]), "__metadata__"),
    # config
    "module path with ..": (lambda c: c["layers"].update({"encoder..x": c["layers"].pop(QLAYER)}),
                            None, "not a module path"),
    "absolute module path": (lambda c: c["layers"].update({"/etc/passwd": c["layers"].pop(QLAYER)}),
                             None, "not a module path"),
    "parent module path": (lambda c: c["modules_to_save"].update({"..": c["modules_to_save"].pop("classifier")}),
                           None, "not a module path"),
    "base weight as a module to save": (lambda c: c["modules_to_save"].update({QLAYER: {}}), None,
                                        "overlaps the adapted layer"),
    # A consistent file (tensor and checksum renamed too) adapting the embedding instead of the query.
    "layer that is not a Linear": (lambda c: (c["layers"].update({EMB: c["layers"].pop(QLAYER)}),
                                              c["tensor_sha256"].update({EMBKEY: c["tensor_sha256"].pop(QKEY)})),
                                   lambda h: h.update({EMBKEY: h.pop(QKEY)}), "does not fit|absent"),
    "huge in_features": (lambda c: c["layers"][QLAYER].update(in_features=2 ** 62), None,
                         "in_features must be an integer"),
    "huge stack": (lambda c: c["config"].update(stack=10 ** 12), None, "does not fit stack"),
    "catastrophic regex": (lambda c: c["config"].update(target_modules="(a+)+$"), None, "bounded matching cost"),
    "polynomial regex": (lambda c: c["config"].update(target_modules=".*a.*b.*c.*d.*e"), None,
                         "bounded matching cost"),
    "back-reference regex": (lambda c: c["config"].update(target_modules=r"(\w+)\.\1"), None,
                             "bounded matching cost"),
    "unhashable dtype": (lambda c: c["config"].update(adapter_dtype=[]), None, "adapter_dtype"),
    "checksums of other tensors": (lambda c: c["tensor_sha256"].update({"x": "0" * 64}), None,
                                   "tensor_sha256 names"),
}

RAW_CONFIGS = {
    "non-UTF-8 config": (lambda c: c.replace(b'"qgoft"', b'"qg\xffoft"', 1), "not a valid JSON"),
    "NaN literal": (lambda c: c.replace(b'"orthogonality_weight": 0.01', b'"orthogonality_weight": NaN'),
                    "not a valid JSON.*NaN"),
    "duplicate key": (lambda c: c[:-2] + b', "format_version": 2}\n', "duplicate key 'format_version'"),
    "deep JSON": (lambda c: b'{"a": ' + _deep(100000) + b"}", "nested deeper"),
    "moderately deep JSON": (lambda c: c[:-2] + b', "x": ' + _deep(40) + b"}\n", "nested deeper"),
    "huge integer": (lambda c: c.replace(b'"stack": 1', b'"stack": ' + b"9" * 5000), "not a valid JSON"),
    "empty config": (lambda c: b"", "not a valid JSON"),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_attack_is_refused_clearly(tmp_path, original, target, case):
    config_bytes, weights, state = original
    edit_config, edit_header, message = ATTACKS[case]
    if edit_config:
        config_bytes = _edit_config(config_bytes, edit_config)
    if edit_header:
        header, data = _split(weights)
        edit_header(header)
        weights = _join(header, data)
    directory = _write(tmp_path / "a", config_bytes, weights)
    model, before = target
    got = _load(directory, model, before, state)
    assert got is not None, "accepted"
    assert __import__("re").search(message, got), got
    base = Classifier()
    base_before = snapshot(base)
    with pytest.raises(AdapterFormatError):
        qgoft.QGoftModel.from_pretrained(base, str(directory))
    assert_same_snapshot(base_before, snapshot(base))


@pytest.mark.parametrize("case", sorted(RAW_CONFIGS))
def test_raw_config_attack_is_refused_clearly(tmp_path, original, target, case):
    config_bytes, weights, state = original
    edit, message = RAW_CONFIGS[case]
    directory = _write(tmp_path / "a", edit(config_bytes), weights)
    model, before = target
    got = _load(directory, model, before, state)
    assert got is not None and __import__("re").search(message, got), got


def test_duplicate_tensor_in_the_header_is_refused(tmp_path, original, target):
    config_bytes, weights, state = original
    header, data = _split(weights)
    text = json.dumps(header)
    entry = json.dumps({QKEY: header[QKEY]})[1:-1]
    raw = (text[:-1] + ", " + entry + "}").encode()  # the same tensor name twice
    directory = _write(tmp_path / "a", config_bytes, _join(None, data, raw))
    model, before = target
    assert "duplicate key" in _load(directory, model, before, state)


def test_oversized_files_are_refused_before_reading(tmp_path, original, target):
    config_bytes, weights, state = original
    model, before = target
    directory = _write(tmp_path / "a", config_bytes, weights)
    with open(directory / CONFIG_NAME, "r+b") as handle:  # sparse: no disk space used
        handle.truncate(serialization.MAX_CONFIG_BYTES + 1)
    assert "larger than the limit" in _load(directory, model, before, state)
    directory = _write(tmp_path / "b", config_bytes, struct.pack("<Q", 2 ** 40) + weights[8:])
    with open(directory / WEIGHTS_NAME, "r+b") as handle:
        handle.truncate(2 ** 41)  # a header length the file could hold, beyond the header limit
    assert "corrupt or truncated safetensors file" in _load(directory, model, before, state)


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path, original, target):
    """A valid header whose length's first byte is 0x80 (a pickle's first byte) is not mistaken for one."""
    config_bytes, weights, state = original
    header, data = _split(weights)
    text = json.dumps(header).encode()
    length = 0x0580 + 0x10000 * -(-max(0, len(text) - 0x0580) // 0x10000)  # little-endian bytes 80 05 ...
    weights = struct.pack("<Q", length) + text + b" " * (length - len(text)) + data
    assert weights[:2] == b"\x80\x05"
    model, before = target
    assert _load(_write(tmp_path / "a", config_bytes, weights), model, before, state) is None
    _reset(model, before)


def test_non_finite_module_to_save_is_refused(tmp_path, original, target):
    config_bytes, weights, state = original
    header, data = _split(weights)
    begin, _ = header["classifier.bias"]["data_offsets"]
    data = bytearray(data)
    data[begin:begin + 4] = struct.pack("<f", float("inf"))
    directory = _write(tmp_path / "a", config_bytes, _join(header, bytes(data)))
    model, before = target
    assert "NaN or infinite" in _load(directory, model, before, state)


def test_fifo_or_directory_in_place_of_a_file_is_refused(tmp_path, original, target):
    config_bytes, weights, state = original
    model, before = target
    directory = tmp_path / "a"
    directory.mkdir()
    (directory / CONFIG_NAME).write_bytes(config_bytes)
    os.mkfifo(directory / WEIGHTS_NAME)  # opening it must not block
    assert "not a regular file" in _load(directory, model, before, state)


# ------------------------------------------------------------------------------------------------
# Fuzzing real saved adapters.
# ------------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from(["..", "/etc/passwd", "a..b", "qgoft", "goft", "float64", "F16", "(a+)+$", "all-linear",
                      QLAYER, QKEY, "classifier", "0" * 64]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)


def _json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _json_paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _json_paths(child, prefix + (index,))


def _replace(value, path, new):
    if not path:
        return new
    container = value
    for key in path[:-1]:
        container = container[key]
    if new is _DELETE:
        del container[path[-1]]
    else:
        container[path[-1]] = new
    return value


_DELETE = object()


@st.composite
def mutations(draw, original):
    config_bytes, weights, _ = original
    kind = draw(st.sampled_from(["header bytes", "header value", "config value", "config bytes", "data bytes"]))
    if kind in ("header bytes", "config bytes", "data bytes"):
        blob = bytearray(weights if kind != "config bytes" else config_bytes)
        (length,) = struct.unpack("<Q", weights[:8])
        low, high = {"header bytes": (0, 8 + length), "config bytes": (0, len(blob)),
                     "data bytes": (8 + length, len(blob))}[kind]
        for _ in range(draw(st.integers(1, 6))):
            position = draw(st.integers(low, high - 1))
            blob[position] = draw(st.integers(0, 255))
        if draw(st.booleans()) and kind != "data bytes":
            cut = draw(st.integers(0, len(blob)))
            blob = blob[:cut] + blob[cut + draw(st.integers(0, 16)):]  # and delete a few bytes
        return (bytes(blob), weights) if kind == "config bytes" else (config_bytes, bytes(blob))
    if kind == "header value":
        header, data = _split(weights)
        paths = [p for p in _json_paths(header) if p]
        header = _replace(header, draw(st.sampled_from(paths)), draw(JSON_VALUES | st.just(_DELETE)))
        return config_bytes, _join(header, data, json.dumps(header, allow_nan=True).encode())
    config = json.loads(config_bytes)
    paths = [p for p in _json_paths(config) if p]
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _json_paths(config) if p]
        try:
            config = _replace(config, draw(st.sampled_from(paths)), draw(JSON_VALUES | st.just(_DELETE)))
        except (KeyError, IndexError, TypeError):
            pass  # the path went away with an earlier mutation
    return json.dumps(config, allow_nan=True).encode(), weights


@settings(max_examples=int(os.environ.get("QGOFT_FUZZ_EXAMPLES", "300")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_adapters_give_a_clear_error_or_a_correct_load(tmp_path, original, target, data):
    config_bytes, weights = data.draw(mutations(original))
    directory = _write(tmp_path / "fuzz", config_bytes, weights)
    model, before = target
    _, _, state = original
    message = _load(directory, model, before, state)
    try:
        read_adapter(str(directory))  # the model-free reader: the same errors, except a misfit to the model
    except AdapterFormatError:
        assert message is not None
    if message is None:  # put the target back as it was for the next example
        _reset(model, before)


def _reset(model, before):
    with torch.no_grad():
        for key, value in model.state_dict().items():
            value.copy_(before["state"][key][0])
    for name, param in model.named_parameters():
        param.requires_grad_(before["grad"][name])
