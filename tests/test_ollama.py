"""Models from an Ollama store (edge_genarm/ollama.py), on stores laid out in Ollama's own format."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from edge_genarm import ollama
from edge_genarm.ollama import OllamaError

FAKE_GGUF = b"GGUF" + (3).to_bytes(4, "little") + bytes(16)


def add_blob(store: Path, data: bytes | None = None, src: Path | None = None) -> str:
    """Store content as blobs/sha256-HEX (a hard link to `src` when possible); returns the digest."""
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if src is not None:
        h = hashlib.sha256()
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        dst = blobs / f"sha256-{h.hexdigest()}"
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    else:
        h = hashlib.sha256(data)
        (blobs / f"sha256-{h.hexdigest()}").write_bytes(data)
    return f"sha256:{h.hexdigest()}"


def add_model(store: Path, ref: str, model_digest: str | None, extra_layers=()) -> Path:
    """A manifest as `ollama pull` writes it: config, then layers (model, template, params...)."""
    host, ns, name, tag = ollama.parse_ref(ref)
    config = add_blob(store, b'{"model_format":"gguf","model_family":"llama"}')
    layers = []
    if model_digest:
        layers.append({"mediaType": ollama.MODEL_MEDIA, "digest": model_digest, "size": 1})
    for media, data in extra_layers:
        layers.append({"mediaType": media, "digest": add_blob(store, data), "size": len(data)})
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config,
            "size": 1,
        },
        "layers": layers,
    }
    path = store / "manifests" / host / ns / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def snapshot(store: Path) -> dict:
    """Every path under the store with its size and mtime: equal snapshots mean nothing was written."""
    return {
        str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(store.rglob("*"))
    }


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ollama-models"
    digest = add_blob(root, FAKE_GGUF)
    template = ("application/vnd.ollama.image.template", b"{{ .Prompt }}")
    add_model(root, "tinyllama", digest, [template])
    add_model(root, "tinyllama:q8", digest)
    add_model(root, "someone/custom:v1", digest)
    add_model(root, "example.com:5000/team/private:latest", digest)
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


def test_parse_ref_defaults_and_forms():
    assert ollama.parse_ref("gemma3") == ("registry.ollama.ai", "library", "gemma3", "latest")
    assert ollama.parse_ref("ollama:gemma3:270m") == ("registry.ollama.ai", "library", "gemma3", "270m")
    assert ollama.parse_ref("me/m:1") == ("registry.ollama.ai", "me", "m", "1")
    assert ollama.parse_ref("h.io:5000/me/m") == ("h.io:5000", "me", "m", "latest")
    assert ollama.parse_ref("x:")[3] == "latest"
    for bad in ("", "a/b/c/d", "../x", "a/../../x", "/x", "x y", ":tag", "a/.hidden"):
        with pytest.raises(OllamaError, match="not an Ollama model name"):
            ollama.parse_ref(bad)


def test_resolve_every_form_to_the_blob_in_place(store):
    blob = next((store / "blobs").glob("sha256-*"))
    expected = {p for p in (store / "blobs").iterdir() if p.read_bytes() == FAKE_GGUF}
    for ref in ("tinyllama", "tinyllama:latest", "ollama:tinyllama:q8", "someone/custom:v1",
                "example.com:5000/team/private"):  # fmt: skip
        got = ollama.resolve(ref)
        assert got in expected and got.parent == store / "blobs", ref
    assert blob.exists()


def test_store_from_home_when_env_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ollama.store_root() == tmp_path / ".ollama" / "models"


def test_missing_name_lists_the_models_there(store):
    with pytest.raises(OllamaError) as e:
        ollama.resolve("llama3:8b")
    msg = str(e.value)
    assert "llama3:8b" in msg and str(store) in msg
    for name in (
        "tinyllama:latest",
        "tinyllama:q8",
        "someone/custom:v1",
        "example.com:5000/team/private:latest",
    ):
        assert name in msg
    assert ollama.list_models(store) == sorted(
        ["tinyllama:latest", "tinyllama:q8", "someone/custom:v1", "example.com:5000/team/private:latest"]
    )


def test_no_store_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    with pytest.raises(OllamaError, match=r"no Ollama store at .*nowhere.*OLLAMA_MODELS"):
        ollama.resolve("tinyllama")


def test_manifest_without_model_layer(store):
    add_model(store, "adapter-only", None, [("application/vnd.ollama.image.adapter", b"lora")])
    with pytest.raises(OllamaError, match=r"no model layer.*image\.adapter"):
        ollama.resolve("adapter-only")


def test_blob_missing(store):
    add_model(store, "gone", "sha256:" + "ab" * 32)
    with pytest.raises(OllamaError, match=r"gone:latest.*sha256-abab.*missing.*ollama pull gone:latest"):
        ollama.resolve("gone")


def test_blob_not_a_gguf(store):
    add_model(store, "safetensors", add_blob(store, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "))
    with pytest.raises(OllamaError, match="not a GGUF"):
        ollama.resolve("safetensors")


def test_manifest_not_json_and_bad_digest(store):
    p = add_model(store, "broken", "sha256:" + "ab" * 32)
    p.write_text("{oops")
    with pytest.raises(OllamaError, match="not readable JSON"):
        ollama.resolve("broken")
    add_model(store, "baddigest", "md5:1234")
    with pytest.raises(OllamaError, match="without a sha256 digest"):
        ollama.resolve("baddigest")


def test_resolving_writes_nothing_in_the_store(store):
    before = snapshot(store)
    ollama.resolve("tinyllama")
    with pytest.raises(OllamaError):
        ollama.resolve("absent")
    ollama.list_models()
    assert snapshot(store) == before


def test_weights_ollama_loads_the_blob_read_only(tiny_bundle, tmp_path, monkeypatch):
    """A real model through `ollama:`: the base of the tiny bundle, laid out in a store, loads and
    generates; the store is untouched afterwards."""
    from edge_genarm import load

    root = tmp_path / "models"
    add_model(root, "tiny:f32", add_blob(root, src=tiny_bundle / "base.gguf"))
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    before = snapshot(root)
    blob = ollama.resolve("ollama:tiny:f32")
    engine = load(str(blob), n_ctx=128)
    try:
        out = engine.generate("Hello", max_tokens=3, seed=0)
        assert len(out.tokens) == 3 or out.finish_reason == "stop"
    finally:
        engine.close()
    assert snapshot(root) == before


@pytest.mark.slow
def test_smollm2_from_an_ollama_store(smollm2_gguf, tmp_path, monkeypatch):
    """The real SmolLM2 GGUF in Ollama's layout: resolved in place, loaded, tokenized as the file."""
    from edge_genarm import load

    root = tmp_path / "models"
    add_model(root, "smollm2:135m", add_blob(root, src=smollm2_gguf),
              [("application/vnd.ollama.image.template", b"{{ .Prompt }}")])  # fmt: skip
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    before = snapshot(root)
    blob = ollama.resolve("smollm2:135m")
    assert blob.stat().st_size == smollm2_gguf.stat().st_size
    engine = load(str(blob), n_ctx=256)
    try:
        assert engine.base.n_vocab == 49152
        assert engine.generate("The capital of France is", max_tokens=4, seed=0).text.strip()
    finally:
        engine.close()
    assert snapshot(root) == before


def test_cli_weights_and_export_base_from_ollama(tiny_bundle, tmp_path, monkeypatch):
    """`--weights ollama:NAME` and `export base ollama:NAME` on the command line; a missing name
    fails in one line listing the store's models."""
    from click.testing import CliRunner

    from edge_genarm.cli import main

    root = tmp_path / "models"
    add_model(root, "tiny:f32", add_blob(root, src=tiny_bundle / "base.gguf"))
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    before = snapshot(root)
    runner = CliRunner()
    r = runner.invoke(main, ["generate", "--weights", "ollama:tiny:f32", "-n", "3", "--seed", "0", "Hello"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", "base", "ollama:tiny:f32", "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["files"]["base.gguf"]["size"] == (tiny_bundle / "base.gguf").stat().st_size
    r = runner.invoke(main, ["generate", "--weights", "ollama:nope", "-n", "1", "Hi"])
    assert r.exit_code != 0 and "no model 'nope:latest'" in r.output and "tiny:f32" in r.output
    assert snapshot(root) == before
