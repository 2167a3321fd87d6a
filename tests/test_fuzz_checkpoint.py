"""Property-based fuzzing of checkpoint loading (issue #7).

Every damaged checkpoint must end in one `UnibcqError` with a one-line message (exit code 2
with one `unibcq: error:` line at the CLI), fast and without allocating what a hostile
header claims, and no file of the checkpoint may change. The checkpoints are built once
per module from a tiny random-init Llama (one block, hidden size 20) and copied before
every example, so the originals stay pristine.

The example counts keep this file near 20 s on one core; `CI=1` derandomizes them (see
tests/conftest.py) and `UNIBCQ_FUZZ_SCALE=N` runs N times as many for a deeper local
search. The plain `test_regression_*` tests at the end pin the bugs the fuzzing found.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unibcq
import unibcq.checkpoint as checkpoint_module
from unibcq.checkpoint import (
    WEIGHTS_FILE, checkpoint_info, has_unibcq_weights, is_checkpoint, load_checkpoint, read_config, read_header,
)
from unibcq.cli import main
from unibcq.errors import UnibcqError
from unibcq.nn.qlinear import PACKED_MODULES

from tiny_models import _build, _tiny_config_kwargs

SCALE = int(os.environ.get("UNIBCQ_FUZZ_SCALE", "1"))
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WORDS = [f"w{i}" for i in range(60)]
TINY = dict(num_hidden_layers=1, hidden_size=20, intermediate_size=36, vocab_size=64, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32)
LOADERS = {"load": load_checkpoint, "info": lambda p: checkpoint_info(p).to_dict(), "read_config": read_config,
           "read_header": read_header}


# --------------------------------------------------------------------------- fixtures and helpers


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two tiny checkpoints with tokenizers: packed BCQ (rtn) and grouped-binary (dyngroup).

    BCQ: 3 bits in groups of 8 (20 and 36 columns leave tail groups), down_proj 2 bits per
    row; grouped-binary: 5 groups (3 index planes, so an index can point past the scales),
    blocks of 8 columns, tied embeddings.
    """
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("fuzz-ckpt")
    tokenizer = _word_tokenizer()
    configs = {
        "bcq": (False, unibcq.QuantConfig("rtn", bits=3, group_size=8,
                                          overrides={"*.mlp.down_proj": {"bits": 2, "group_size": -1}})),
        "gb": (True, unibcq.QuantConfig("dyngroup", bits=1, group_size=-1, max_groups=5, lam=0.0, algorithm="dp",
                                        granularity="block:8")),
    }
    out = {}
    for name, (tied, config) in configs.items():
        model = _build(LlamaConfig(**_tiny_config_kwargs(tied, **TINY)), seed=3)
        unibcq.quantize(model, config, show_progress=False)
        out[name] = unibcq.save(model, root / name, config, source_model="tiny-fuzz-source", tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("fuzz-corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    return path


_counter = itertools.count()


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(src) -> a fresh copy of checkpoint `src` under tmp_path (one per example)."""
    made: list[Path] = []

    def make(src: Path) -> Path:
        for old in made:  # one example at a time: drop the previous example's copy
            shutil.rmtree(old, ignore_errors=True)
        made.clear()
        target = tmp_path / f"case{next(_counter)}"
        shutil.copytree(src, target)
        made.append(target)
        return target

    return make


@pytest.fixture
def real_builds(monkeypatch) -> list[str]:
    """Records the device of every model build of the loader ('meta' for the size check)."""
    builds: list[str] = []
    original = checkpoint_module._build_model

    def recording(*args, **kwargs):
        builds.append(torch.get_default_device().type)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "_build_model", recording)
    return builds


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and len(message) < 1000, repr(message)
    return message


def must_fail(directory: Path, loaders=("load", "info")) -> list[str]:
    """Every named loader raises a UnibcqError (any other exception fails the test)."""
    before = digest(directory)
    messages = []
    for name in loaders:
        with pytest.raises(UnibcqError) as info:
            LOADERS[name](directory)
        messages.append(one_line(info.value))
    assert digest(directory) == before
    return messages


def loads_or_fails(directory: Path, loaders=("load", "info", "read_config", "read_header")) -> dict[str, object]:
    """Each loader returns or raises a UnibcqError; a loaded model runs a forward pass."""
    before = digest(directory)
    results: dict[str, object] = {}
    for name in loaders:
        try:
            results[name] = LOADERS[name](directory)
        except UnibcqError as exc:
            one_line(exc)
            results[name] = exc
    assert isinstance(is_checkpoint(directory), bool) and isinstance(has_unibcq_weights(directory), bool)
    model = results.get("load")
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[2, 5, 7, 11, 3]])).logits
        assert logits.shape == (1, 5, TINY["vocab_size"])
    assert digest(directory) == before
    return results


def header_of(weights: Path) -> tuple[int, dict, bytes]:
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_weights(weights: Path, header: dict, body: bytes, length: int | None = None) -> None:
    encoded = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + body)


def edit_config(directory: Path, change) -> None:
    cfg = directory / "config.json"
    data = json.loads(cfg.read_text())
    change(data)
    cfg.write_text(json.dumps(data))


KINDS = st.sampled_from(["bcq", "gb"])


# --------------------------------------------------------------------------- model.safetensors


@settings(max_examples=30 * SCALE, **FUZZ)
@given(kind=KINDS, data=st.data())
def test_truncated_weights_always_fail(checkpoints, copy_of, kind, data):
    d = copy_of(checkpoints[kind])
    weights = d / WEIGHTS_FILE
    raw = weights.read_bytes()
    keep = data.draw(st.one_of(st.integers(0, 16), st.integers(0, len(raw) - 1)), label="keep")
    weights.write_bytes(raw[:keep])
    must_fail(d, ("load", "info", "read_header"))


@settings(max_examples=60 * SCALE, **FUZZ)
@given(kind=KINDS, data=st.data())
def test_random_byte_edits_load_or_fail(checkpoints, copy_of, kind, data):
    """Bit flips and overwritten bytes anywhere: a clean error, or a model that runs.

    Without a checksum manifest a flip in the tensor data can load (the format has no
    redundancy); it must then still be a finite, runnable model.
    """
    d = copy_of(checkpoints[kind])
    weights = d / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    region = data.draw(st.sampled_from([(0, 8), (8, 8 + header_len), (0, len(raw))]), label="region")
    edits = data.draw(st.lists(st.tuples(st.integers(*region).filter(lambda i: i < len(raw)),
                                         st.one_of(st.integers(0, 7).map(lambda b: ("flip", b)),
                                                   st.integers(0, 255).map(lambda v: ("set", v)))),
                               min_size=1, max_size=6), label="edits")
    for pos, (op, value) in edits:
        raw[pos] = raw[pos] ^ (1 << value) if op == "flip" else value
    weights.write_bytes(bytes(raw))
    loads_or_fails(d)


SAFETENSORS_DTYPES = ["U8", "I8", "F16", "BF16", "F32", "F64", "I64", "BOOL", "F8_E4M3", "C64", "X", ""]
HUGE = st.one_of(st.integers(0, 40), st.sampled_from([10**12, 2**31, 2**32 + 1, 2**62, 2**64 - 1]),
                 st.integers(0, 2**64 - 1))


@settings(max_examples=60 * SCALE, **FUZZ)
@given(kind=KINDS, data=st.data())
def test_hostile_safetensors_header_fails_fast(checkpoints, copy_of, real_builds, kind, data):
    """A hand-made header (huge shapes / offsets / header length, odd dtypes) fails before any build."""
    real_builds.clear()  # one record per hypothesis example
    d = copy_of(checkpoints[kind])
    weights = d / WEIGHTS_FILE
    _, header, body = header_of(weights)
    names = sorted(k for k in header if k != "__metadata__")
    target = data.draw(st.sampled_from(names + ["new.tensor"]), label="tensor")
    original = header.get(target)
    entry = {
        "dtype": data.draw(st.sampled_from(SAFETENSORS_DTYPES), label="dtype"),
        "shape": data.draw(st.lists(HUGE, max_size=4), label="shape"),
        "data_offsets": data.draw(st.one_of(st.tuples(HUGE, HUGE).map(list),
                                            st.just(original["data_offsets"] if original else [0, 0])),
                                  label="offsets"),
    }
    header[target] = entry
    length = data.draw(st.one_of(st.none(), HUGE), label="length")
    write_weights(weights, header, body, length)
    if entry == original and length in (None, len(json.dumps(header).encode())):
        return  # nothing changed
    must_fail(d)
    assert "cpu" not in real_builds
    try:  # a well-formed header with a wrong tensor (e.g. an extra empty one) is only wrong for the config
        read_header(d)
    except UnibcqError as exc:
        one_line(exc)


@pytest.mark.parametrize("claim", [[10**12], [10**6, 10**6], [2**63, 2], [1, 0, 10**12]])
def test_tensor_claiming_a_huge_shape_fails_without_allocating(checkpoints, copy_of, real_builds, claim):
    d = copy_of(checkpoints["bcq"])
    weights = d / WEIGHTS_FILE
    _, header, body = header_of(weights)
    header["model.norm.weight"]["shape"] = claim
    write_weights(weights, header, body)
    message = must_fail(d, ("load", "info", "read_header"))[0]
    assert "alloc" not in message and WEIGHTS_FILE in message
    assert real_builds == []  # the header is rejected before even the meta-device build


# --------------------------------------------------------------------------- config.json


def leaf_paths(obj, prefix=()):
    """Every key path of a JSON object, containers included."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaf_paths(value, prefix + (key,))
    if prefix:
        yield prefix


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 7, 8, 9, 255, 256, 2**24 + 1, 2**31, 2**63, 10**30, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.sampled_from(["", "bcq", "grouped-binary", "block:0", "block:3", "block:\u00b2", "row", "matrix",
                     "float16", "bfloat16", "int8", "llama", "qwen2", "mixtral", "gpt2", "unibcq"]),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                            max_size=3), max_leaves=6)


@settings(max_examples=100 * SCALE, **FUZZ)
@given(kind=KINDS, data=st.data())
def test_config_edits_load_or_fail_before_allocating(checkpoints, copy_of, real_builds, kind, data):
    """Wrong types, huge numbers, missing keys anywhere in config.json.

    The tensor data is intact, so a failure must come before the real (non-meta) model is
    built: nothing is allocated from what the edited config claims.
    """
    real_builds.clear()  # one record per hypothesis example
    d = copy_of(checkpoints[kind])
    cfg = json.loads((d / "config.json").read_text())
    paths = sorted(set(leaf_paths(cfg)), key=repr)
    for _ in range(data.draw(st.integers(1, 3), label="n_edits")):
        path = data.draw(st.sampled_from(paths), label="path")
        parent = cfg
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if data.draw(st.booleans(), label="delete"):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    (d / "config.json").write_text(json.dumps(cfg))
    results = loads_or_fails(d, ("load", "info", "read_config"))
    if not isinstance(results["load"], torch.nn.Module):
        assert "cpu" not in real_builds, results["load"]


def _packed_shapes(spec: dict) -> dict:
    with torch.device("meta"):
        module = PACKED_MODULES[spec.get("format", "bcq")].from_layout(spec, torch.float32)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@settings(max_examples=60 * SCALE, **FUZZ)
@given(kind=KINDS, data=st.data())
def test_layer_layout_disagreeing_with_tensors_fails(checkpoints, copy_of, real_builds, kind, data):
    """bits / group_size / shape / format / offset / bias edited in one layer's layout.

    Whenever the edited layout implies other packed tensors than the stored ones, load and
    info must fail, before the real model is built. (A group size with the same number of
    groups per row implies the same tensors and cannot be told apart without checksums.)
    """
    real_builds.clear()  # one record per hypothesis example
    d = copy_of(checkpoints[kind])
    cfg = json.loads((d / "config.json").read_text())
    layers = cfg["quantization_config"]["layers"]
    name = data.draw(st.sampled_from(sorted(layers)), label="layer")
    spec = layers[name]
    original = dict(spec)
    field_values = {
        "in_features": st.integers(1, 80), "out_features": st.integers(1, 80), "bias": st.booleans(),
        "format": st.sampled_from(sorted(PACKED_MODULES)),
    }
    if spec.get("format", "bcq") == "bcq":
        field_values |= {"bits": st.integers(1, 8), "group_size": st.one_of(st.just(-1), st.integers(1, 50)),
                         "offset": st.booleans()}
    else:
        field_values |= {"max_groups": st.integers(1, 256),
                         "granularity": st.one_of(st.sampled_from(["matrix", "row"]),
                                                  st.integers(1, 40).map(lambda n: f"block:{n}"))}
    field = data.draw(st.sampled_from(sorted(field_values)), label="field")
    value = data.draw(field_values[field].filter(lambda v: v != original.get(field)), label="value")
    spec[field] = value
    if field == "format":  # give the other format the fields it needs
        spec.setdefault("bits", 3), spec.setdefault("group_size", 8)
        spec.setdefault("max_groups", 5), spec.setdefault("granularity", "block:8")
    (d / "config.json").write_text(json.dumps(cfg))
    same_tensors = (field not in ("in_features", "out_features", "bias", "format")
                    and _packed_shapes(spec) == _packed_shapes(original))
    if same_tensors:
        loads_or_fails(d)
    else:
        must_fail(d)
        assert "cpu" not in real_builds


@pytest.mark.parametrize("content", [b"", b"{", b"null", b"[]", b"\"text\"", b"\xff\xfe\x00", b"{" * 10,
                                     b"[" * 200_000, b"{\"a\": 1" + b"0" * 5000 + b"}", b"NaN"])
def test_config_not_an_object_or_not_json(checkpoints, copy_of, content):
    d = copy_of(checkpoints["bcq"])
    (d / "config.json").write_bytes(content)
    must_fail(d, ("load", "info", "read_config"))
    assert is_checkpoint(d) is False


def test_oversized_config_is_not_read(checkpoints, copy_of):
    d = copy_of(checkpoints["bcq"])
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text[:-2] + ', "padding": "' + "x" * (checkpoint_module.MAX_CONFIG_BYTES) + '"}')
    assert "bytes" in must_fail(d, ("load", "info", "read_config"))[0]
    assert is_checkpoint(d) is False


def test_missing_files(checkpoints, copy_of):
    for name in ("config.json", WEIGHTS_FILE):
        d = copy_of(checkpoints["gb"])
        (d / name).unlink()
        must_fail(d)
        d = copy_of(checkpoints["gb"])
        (d / name).unlink()
        (d / name).mkdir()  # a directory where the file should be
        must_fail(d)


# --------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def eval_args(d: Path, corpus: Path) -> list:
    return ["eval", d, "--ppl", corpus, "--seq-len", "8", "--max-windows", "1", "--kl-ref", "none", "--no-progress"]


def _break(d: Path, how: str, cut: float) -> None:
    weights = d / WEIGHTS_FILE
    if how == "truncate":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: int(cut * (len(raw) - 1))])
    elif how == "config-not-json":
        (d / "config.json").write_text("{\"quantization_config\": ")
    elif how == "config-deep":
        (d / "config.json").write_text("[" * 100_000)
    elif how == "bits-edited":
        edit_config(d, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(bits=4))
    elif how == "hidden-size-huge":
        edit_config(d, lambda c: c.update(hidden_size=10**7))
    elif how == "header-length":
        raw = weights.read_bytes()
        weights.write_bytes(struct.pack("<Q", int(cut * 2**64) % 2**64) + raw[8:])
    elif how == "huge-shape":
        _, header, body = header_of(weights)
        header["model.norm.weight"]["shape"] = [10**12]
        write_weights(weights, header, body)
    elif how == "nan-alpha":
        _, header, body = header_of(weights)
        start = header["model.layers.0.mlp.up_proj.bcq_alpha"]["data_offsets"][0]
        body = body[:start] + struct.pack("<e", math.nan) + body[start + 2 :]
        write_weights(weights, header, body)
    elif how == "tokenizer-garbage":
        (d / "tokenizer.json").write_text("{\"model\": 5}")
    elif how == "weights-missing":
        weights.unlink()


BREAKAGES = ["truncate", "config-not-json", "config-deep", "bits-edited", "hidden-size-huge", "header-length",
             "huge-shape", "nan-alpha", "tokenizer-garbage", "weights-missing"]
INFO_UNAFFECTED = {"nan-alpha", "tokenizer-garbage"}  # info reads neither the tensor data nor the tokenizer


@settings(max_examples=10 * SCALE, **FUZZ)
@given(how=st.sampled_from(BREAKAGES), command=st.sampled_from(["info", "eval"]), cut=st.floats(0, 1))
def test_cli_on_broken_checkpoint_exits_2_with_one_line(checkpoints, corpus, copy_of, capsys, how, command, cut):
    d = copy_of(checkpoints["bcq"])
    _break(d, how, cut)
    before = digest(d)
    code, out, err = run_cli(capsys, *(["info", d] if command == "info" else eval_args(d, corpus)))
    if command == "info" and how in INFO_UNAFFECTED:
        assert code == 0, err
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (out, err)
        assert len(lines) == 1 and lines[0].startswith("unibcq: error: "), err
        assert "Traceback" not in err + out
    assert digest(d) == before


@pytest.mark.parametrize("kind", ["bcq", "gb"])
def test_cli_accepts_the_intact_checkpoints(checkpoints, corpus, capsys, kind):
    before = digest(checkpoints[kind])
    code, out, err = run_cli(capsys, "info", checkpoints[kind], "--layers")
    assert code == 0, err
    code, out, err = run_cli(capsys, *eval_args(checkpoints[kind], corpus))
    assert code == 0, err
    assert digest(checkpoints[kind]) == before


# --------------------------------------------------------------------------- regressions


def test_regression_deeply_nested_config(checkpoints, copy_of, corpus, capsys):
    """json.loads raised RecursionError through read_config and is_checkpoint."""
    d = copy_of(checkpoints["bcq"])
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "not valid JSON" in must_fail(d, ("load", "info", "read_config"))[0]
    assert is_checkpoint(d) is False
    code, _, err = run_cli(capsys, *eval_args(d, corpus))
    assert code == 2 and "config.json" in err


def test_regression_integer_literal_past_the_digit_limit(checkpoints, copy_of):
    """A 5000-digit integer made json.loads raise a bare ValueError."""
    d = copy_of(checkpoints["bcq"])
    text = (d / "config.json").read_text().replace('"hidden_size": 20', '"hidden_size": 1' + "0" * 5000)
    (d / "config.json").write_text(text)
    assert "not valid JSON" in must_fail(d, ("load", "read_config"))[0]


def test_regression_huge_value_is_cut_in_the_message(checkpoints, copy_of):
    d = copy_of(checkpoints["bcq"])
    edit_config(d, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(bits=10**400))
    assert all(len(m) < 300 for m in must_fail(d))


def test_regression_format_version_true(checkpoints, copy_of):
    """format_version: true compared equal to 1 and loaded."""
    d = copy_of(checkpoints["bcq"])
    edit_config(d, lambda c: c["quantization_config"].update(format_version=True))
    assert "format version" in must_fail(d)[0]


def test_regression_accounting_key_of_wrong_type(checkpoints, copy_of):
    """checkpoint_info raised TypeError adding a string bits_per_weight_paper to a float."""
    d = copy_of(checkpoints["gb"])
    edit_config(d, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(
        bits_per_weight_paper="x"))
    assert "bits_per_weight_paper" in must_fail(d)[1]


@pytest.mark.parametrize("key,value", [("offset", "no"), ("bias", 1), ("offset", None)])
def test_regression_non_boolean_offset_or_bias(checkpoints, copy_of, key, value):
    """offset: "no" was read as bool("no") == True and loaded."""
    d = copy_of(checkpoints["bcq"])
    edit_config(d, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update({key: value}))
    assert key in must_fail(d)[0]


@pytest.mark.parametrize("key,value", [("method", ["rtn"]), ("bits", "3"), ("group_size", 8.0), ("source_model", 5)])
def test_regression_top_level_field_types(checkpoints, copy_of, corpus, capsys, key, value):
    """source_model: 5 crashed `unibcq eval` with a TypeError; method/bits printed as garbage."""
    d = copy_of(checkpoints["bcq"])
    edit_config(d, lambda c: c["quantization_config"].update({key: value}))
    (d / "tokenizer_config.json").unlink()  # eval then takes the tokenizer from source_model
    assert key in must_fail(d)[0]
    code, _, err = run_cli(capsys, *eval_args(d, corpus))
    assert code == 2 and key in err


@pytest.mark.parametrize("edit,needle", [
    ({"vocab_size": 10**9}, "lm_head.weight"),
    ({"hidden_size": 10**6}, "shape in quantization_config"),
    ({"intermediate_size": 10**9}, "shape in quantization_config"),
    ({"num_hidden_layers": 10**6}, "decoder layers"),
    ({"model_type": "mixtral", "num_local_experts": 10**6}, "model_type"),
    ({"model_type": "gpt2"}, "model_type"),
])
def test_regression_hostile_sizes_fail_before_allocating(checkpoints, copy_of, real_builds, edit, needle):
    """vocab_size 10**9 made the loader allocate a 64 GB embedding (and report the allocator's
    failure); 10**6 layers took minutes to build; any transformers architecture was built."""
    d = copy_of(checkpoints["bcq"])
    edit_config(d, lambda c: c.update(edit))
    message = must_fail(d, ("load",))[0]
    assert needle in message and "alloc" not in message
    assert "cpu" not in real_builds


def test_regression_multi_line_transformers_error_is_one_line(checkpoints, copy_of):
    d = copy_of(checkpoints["bcq"])
    edit_config(d, lambda c: c.update(num_hidden_layers=1.5))
    must_fail(d, ("load",))


def test_regression_info_checks_packed_shapes(checkpoints, copy_of, capsys):
    """`unibcq info` reported figures (exit 0) for a layout that disagrees with the tensors."""
    d = copy_of(checkpoints["bcq"])
    edit_config(d, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(bits=4))
    assert "model.layers.0.mlp.up_proj" in must_fail(d, ("info",))[0]
    code, _, err = run_cli(capsys, "info", d)
    assert code == 2 and "model.layers.0.mlp.up_proj" in err


def strip_manifest(directory: Path) -> Path:
    """Make `directory` look like a checkpoint written before manifests, so only value checks apply."""
    (directory / "manifest.json").unlink()
    edit_config(directory, lambda c: c["quantization_config"].pop("manifest"))
    return directory


def _poke(weights: Path, tensor: str, payload: bytes) -> None:
    _, header, body = header_of(weights)
    start = header[tensor]["data_offsets"][0]
    write_weights(weights, header, body[:start] + payload + body[start + len(payload) :])


@pytest.mark.parametrize("kind,tensor,payload", [
    ("bcq", "model.layers.0.mlp.up_proj.bcq_alpha", struct.pack("<e", math.nan)),
    ("bcq", "model.layers.0.self_attn.o_proj.bcq_offset", struct.pack("<e", math.inf)),
    ("bcq", "model.norm.weight", struct.pack("<f", -math.inf)),
    ("gb", "model.layers.0.mlp.down_proj.gb_scales", struct.pack("<e", math.nan)),
])
def test_regression_non_finite_values_rejected_at_load(checkpoints, copy_of, kind, tensor, payload):
    """A flipped fp16 exponent (NaN/inf scale) loaded silently and poisoned every output."""
    d = copy_of(checkpoints[kind])
    _poke(d / WEIGHTS_FILE, tensor, payload)
    assert "checksum" in must_fail(d, ("load",))[0]
    assert "NaN/inf" in must_fail(strip_manifest(d), ("load",))[0]


def test_regression_group_index_past_the_scales(checkpoints, copy_of):
    """With 5 groups (3 index planes) an index of 7 made the first forward pass raise IndexError."""
    d = copy_of(checkpoints["gb"])
    _, header, _ = header_of(d / WEIGHTS_FILE)
    start, end = header["model.layers.0.mlp.up_proj.gb_index"]["data_offsets"]
    _poke(d / WEIGHTS_FILE, "model.layers.0.mlp.up_proj.gb_index", b"\xff" * (end - start))
    assert "gb_index" in must_fail(strip_manifest(d), ("load",))[0]


def test_regression_transformers_loader_validates_layouts(checkpoints, copy_of):
    """AutoModelForCausalLM.from_pretrained built BCQLinear(bits="3") and crashed in torch.zeros."""
    from transformers import AutoModelForCausalLM

    d = copy_of(checkpoints["bcq"])
    edit_config(d, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(bits="3"))
    with pytest.raises(UnibcqError, match="model.layers.0.mlp.up_proj"):
        AutoModelForCausalLM.from_pretrained(d)


def test_regression_cli_eval_recognises_a_checkpoint_with_a_damaged_config(checkpoints, copy_of, corpus, capsys):
    """A list in config.json sent eval to the plain transformers loader: ValueError traceback."""
    d = copy_of(checkpoints["bcq"])
    (d / "config.json").write_text("[1]")
    assert has_unibcq_weights(d) and not is_checkpoint(d)
    code, _, err = run_cli(capsys, *eval_args(d, corpus))
    assert code == 2 and "config.json must hold a JSON object" in err


@pytest.mark.parametrize("name,content", [("tokenizer.json", "{garbage"), ("tokenizer.json", "{}"),
                                          ("tokenizer.json", "{\"model\": 5}"), ("tokenizer_config.json", "[1]")])
def test_regression_cli_eval_malformed_tokenizer(checkpoints, copy_of, corpus, capsys, name, content):
    """JSONDecodeError / KeyError / tokenizers' bare Exception escaped as tracebacks."""
    d = strip_manifest(copy_of(checkpoints["bcq"]))
    (d / name).write_text(content)
    code, _, err = run_cli(capsys, *eval_args(d, corpus))
    assert code == 2 and "malformed" in err and len(err.strip().splitlines()) == 1


def test_regression_cli_info_layers_of_a_dyngroup_checkpoint(checkpoints, capsys):
    """`unibcq info --layers` raised KeyError('group_size') on grouped-binary layers."""
    code, out, err = run_cli(capsys, "info", checkpoints["gb"], "--layers")
    assert code == 0, err
    assert "block:8" in out
