"""Property tests over the readers of untrusted files: the GGUF reader, the manifest validator,
tokens.json and the prompt-file reader. Whatever the bytes, each returns what was written or
raises its own one-line error (never another exception, never a hang); valid files written by
an independent encoder (tests/gguf_edit.py, json) read back exactly.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_genarm.bundle import Bundle
from edge_genarm.errors import BundleError, ModelFileError, TokenizerMismatchError
from edge_genarm.gguf import read_gguf
from edge_genarm.manifest import FORMAT, validate_manifest
from edge_genarm.records import DataError, read_prompts
from edge_genarm.tokens import load_arm_tokens

from .gguf_edit import ARRAY, F32, GGUF, KV, STRING, U32, Tensor, encode, parse

# 150 examples a test in CI (seconds); FUZZ_EXAMPLES=5000 for a longer hunt
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _one_line(e: Exception) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


# ---------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------

scalars = st.one_of(
    st.tuples(st.just(U32), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(F32), st.floats(allow_nan=False, width=32)),
    st.tuples(st.just(STRING), st.text(max_size=20)),
    st.tuples(st.just(ARRAY), st.tuples(st.just(STRING), st.lists(st.text(max_size=8), max_size=20))),
    st.tuples(st.just(ARRAY), st.tuples(st.just(U32), st.lists(st.integers(0, 2**32 - 1), max_size=20))),
)
metadata = st.dictionaries(
    st.text(min_size=1, max_size=24).filter(lambda k: not k.startswith("general.")), scalars, max_size=8
)


def small_gguf(meta: dict, n_tensors: int = 2) -> bytes:
    """A small valid GGUF v3: `meta` plus f32 tensors of 4x8 values each."""
    kvs = [KV("general.architecture", STRING, encode(STRING, "llama"), -1)]
    kvs += [KV(k, t, encode(t, v), -1) for k, (t, v) in meta.items() if k != "general.architecture"]
    tensors = [Tensor(f"t{i}", [8, 4], 0, i * 128, -1) for i in range(n_tensors)]
    data = b"".join(struct.pack("<32f", *([float(i)] * 32)) for i in range(n_tensors))
    return GGUF(3, kvs, tensors, data, 0, 0).to_bytes()


@FUZZ
@given(meta=metadata)
def test_gguf_metadata_reads_back_exactly(meta, tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(small_gguf(meta))
    info = read_gguf(p)
    assert info.n_tensors == 2 and info.architecture == "llama"
    for k, (t, v) in meta.items():
        if k == "general.architecture":
            continue
        got = info.metadata[k]
        want = v[1] if t == ARRAY else v
        if t == F32:
            assert got == struct.unpack("<f", struct.pack("<f", v))[0]
        else:
            assert got == want


@FUZZ
@given(
    meta=metadata,
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_damaged_gguf_is_read_or_refused_in_one_line(meta, edits, cut, tmp_path):
    data = bytearray(small_gguf(meta))
    for pos, byte in edits:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    p = tmp_path / "d.gguf"
    p.write_bytes(bytes(data))
    try:
        info = read_gguf(p)
    except ModelFileError as e:
        _one_line(e)
        assert str(p) in str(e)
    else:
        assert isinstance(info.metadata, dict) and info.n_tensors >= 0


@FUZZ
@given(
    field=st.sampled_from(["version", "n_tensors", "n_kv", "first_key_len"]), value=st.integers(0, 2**64 - 1)
)
def test_any_header_count_is_read_or_refused(field, value, tmp_path):
    data = bytearray(small_gguf({"a": (U32, 1)}))
    off, fmt = {
        "version": (4, "<I"),
        "n_tensors": (8, "<Q"),
        "n_kv": (16, "<Q"),
        "first_key_len": (24, "<Q"),
    }[field]
    struct.pack_into(fmt, data, off, value % (2 ** (8 * struct.calcsize(fmt))))
    p = tmp_path / "h.gguf"
    p.write_bytes(bytes(data))
    try:
        read_gguf(p)
    except ModelFileError as e:
        _one_line(e)


@FUZZ
@given(
    key=st.sampled_from(["bos", "eos"]),
    n_vocab=st.integers(1, 40),
    value=st.one_of(st.integers(0, 60), st.integers(0, 2**32 - 1)),
)
def test_bos_and_eos_must_be_in_the_vocabulary(key, n_vocab, value, tmp_path):
    field = f"tokenizer.ggml.{key}_token_id"
    meta = {"tokenizer.ggml.tokens": (ARRAY, (STRING, [f"t{i}" for i in range(n_vocab)])), field: (U32, value)}
    p = tmp_path / "ids.gguf"
    p.write_bytes(small_gguf(meta))
    if value < n_vocab:
        assert read_gguf(p).get(field) == value
        return
    with pytest.raises(ModelFileError) as e:
        read_gguf(p)
    _one_line(e.value)
    assert field in str(e.value) and f"= {value}" in str(e.value) and f"{n_vocab} tokens" in str(e.value)
    assert str(p) in str(e.value)


def test_a_real_gguf_with_eos_outside_its_vocabulary_is_refused(tiny_bundle, tmp_path):
    from edge_genarm import load

    src = next(Path(tiny_bundle).glob("*.gguf"))
    g = parse(src.read_bytes())
    n = len(read_gguf(src).tokens)
    g.set("tokenizer.ggml.eos_token_id", U32, n + 7)
    bad = tmp_path / "eos.gguf"
    bad.write_bytes(g.to_bytes())
    with pytest.raises(ModelFileError, match=rf"tokenizer\.ggml\.eos_token_id = {n + 7}, outside its vocabulary"):
        read_gguf(bad)
    with pytest.raises(ModelFileError, match="eos_token_id"):
        load(str(bad))


# ---------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _valid_manifest() -> dict:
    return {
        "format": FORMAT,
        "format_version": 1,
        "base": {"file": "base.gguf"},
        "arms": {"a": {"file": "arms/a/model.onnx", "tokens": "arms/a/tokens.json", "beta_r": 0.1,
                       "default_weight": 1.0}},
        "files": {"base.gguf": {"size": 3, "sha256": "0" * 64}},
    }  # fmt: skip


def _paths(obj, prefix=()):
    """Every path to a value inside nested dicts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


@FUZZ
@given(value=json_values)
def test_any_json_is_a_manifest_or_one_bundle_error(value, tmp_path):
    try:
        validate_manifest(value, tmp_path / "manifest.json")
    except BundleError as e:
        _one_line(e)
        assert "manifest.json" in str(e)


@FUZZ
@given(which=st.integers(0, 100), value=json_values)
def test_a_field_replaced_by_any_json_is_accepted_only_when_valid(which, value, tmp_path):
    m = _valid_manifest()
    paths = list(_paths(m))
    *keys, last = paths[which % len(paths)]
    d = m
    for k in keys:
        d = d[k]
    d[last] = value
    try:
        validate_manifest(m, tmp_path / "manifest.json")
    except BundleError as e:
        _one_line(e)
        return
    b = Bundle(tmp_path, m)  # what passed the validator builds a bundle without surprises
    for a in b.arms.values():
        assert isinstance(a.default_weight, float) and a.default_weight == a.default_weight
        assert a.beta_r is None or a.beta_r > 0
        assert a.path.is_relative_to(tmp_path)
    assert b.base_path.is_relative_to(tmp_path)


def test_the_valid_manifest_is_valid(tmp_path):
    assert validate_manifest(_valid_manifest(), tmp_path / "manifest.json")["arms"]["a"]["beta_r"] == 0.1


# ---------------------------------------------------------------------------
# tokens.json
# ---------------------------------------------------------------------------


@FUZZ
@given(value=json_values)
def test_any_tokens_json_is_a_token_list_or_one_error(value, tmp_path):
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps(value))
    try:
        toks = load_arm_tokens(p, "a")
    except TokenizerMismatchError as e:
        _one_line(e)
        assert "tokens.json" in str(e)
    else:
        assert toks and all(isinstance(t, str) for t in toks)


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_as_tokens_json(data, tmp_path):
    p = tmp_path / "tokens.json"
    p.write_bytes(data)
    try:
        toks = load_arm_tokens(p, "a")
    except TokenizerMismatchError as e:
        _one_line(e)
    else:
        assert all(isinstance(t, str) for t in toks)


# ---------------------------------------------------------------------------
# prompt files
# ---------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=400))
def test_any_bytes_as_a_prompt_file(data, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(data)
    try:
        out = read_prompts(p)
    except DataError as e:
        _one_line(e)
        assert str(p) in str(e)
    else:
        assert out and all(isinstance(i, int) and isinstance(s, str) and s.strip() for i, s in out)


@FUZZ
@given(
    lines=st.lists(st.one_of(st.text(max_size=20).filter(str.strip), json_values), min_size=1, max_size=12)
)
def test_prompt_files_read_back_exactly_or_name_the_line(lines, tmp_path):
    """Each line is a prompt string (written as {"prompt": s}) or arbitrary JSON; with
    on_error="skip" exactly the prompt lines come back, with their line indices."""
    rows = [json.dumps({"prompt": x} if isinstance(x, str) else x) for x in lines]
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(rows) + "\n")
    want = [
        (i, x if isinstance(x, str) else x["prompt"])
        for i, x in enumerate(lines)
        if (isinstance(x, str) and x.strip())
        or (isinstance(x, dict) and isinstance(x.get("prompt"), str) and x["prompt"].strip())
    ]
    stats: dict = {}
    try:
        got = read_prompts(p, on_error="skip", stats=stats)
    except DataError as e:
        assert not want and "has no prompts" in str(e)
        return
    assert got == want
    assert stats.get("bad_lines", 0) == len(lines) - len(want)
    if len(want) < len(lines):
        with pytest.raises(DataError, match=r"line \d+"):
            read_prompts(p, on_error="stop")


def test_a_path_that_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path)
    assert Path(tmp_path).is_dir()
