"""Heads on the base's own trunk: the base's layer output read through llama.cpp's eval
callback (backends.capture), gated and recorded at export (export/base_tap.py), chosen at load
(loader.choose_tap). Checked against PyTorch and against the trunk graph, refusals named."""

import json
import shutil

import numpy as np
import pytest

from edge_genarm import guidance as G
from edge_genarm.errors import BundleError, ConfigError

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tapped(tmp_path_factory):
    """(bundle, hf folders): an f32 GGUF base made from a 3-layer init, two sibling ARMs of that
    init (layer 2 moved) on one shared trunk (layers 0-1), and a passed base-tap record."""
    from edge_genarm.export.base_tap import base_tap
    from edge_genarm.export.bundle_write import add_arm, add_base
    from edge_genarm.export.converter import convert_hf_to_gguf
    from edge_genarm.export.onnx_export import export_arm_onnx
    from edge_genarm.export.share import share_trunk

    from tests.test_share import _sibling_hf

    root = tmp_path_factory.mktemp("tap")
    hf = {n: _sibling_hf(root, n, seed) for n, seed in (("a", 1), ("b", 2))}
    convert_hf_to_gguf(root / "hf_init", root / "base.gguf", "f32")
    bundle = root / "bundle"
    add_base(bundle, root / "base.gguf")
    for n in hf:
        export_arm_onnx(hf[n], root / "onnx" / n)
        add_arm(bundle, root / "onnx" / n, name=n, beta_r=0.1, weight=1.0)
    share_trunk(bundle, log=lambda s: None)
    untapped = root / "untapped"
    shutil.copytree(bundle, untapped)
    rec = base_tap(bundle, log=lambda s: None)
    assert rec["passed"] and rec["layer"] == 1 and rec["node"] == "l_out-1"
    return bundle, untapped, {**hf, "init": root / "hf_init"}


def _load(bundle, **kw):
    from edge_genarm import load

    return load(str(bundle), n_ctx=256, **kw)


def test_the_tapped_layer_is_the_base_layer_output_in_pytorch(tapped):
    from transformers import AutoModelForCausalLM

    from edge_genarm.backends.llama_base import LlamaBase

    bundle, _, hf = tapped
    base = LlamaBase(bundle / "base.gguf", n_ctx=64, threads=1, tap=1)
    ids = [1, 520, 33, 901, 7, 4000, 12]
    base.prefill(ids[:5])
    base.step(ids[5])
    base.step(ids[6])  # a prefill batch, then one position at a time: rows land at their positions
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(hf["init"])(torch.tensor([ids]), output_hidden_states=True)
    want = out.hidden_states[2][0].numpy()  # hidden_states[i + 1]: the output of layer i
    assert base.hidden.shape == want.shape
    np.testing.assert_allclose(base.hidden, want, atol=2e-3, rtol=1e-3)


def test_heads_on_the_base_generate_what_the_trunk_graph_does(tapped):
    bundle, _, _ = tapped
    kw = dict(max_tokens=10, seed=4, sampling=G.SamplingParams(1.0, 0, 1.0, 0.0))
    on_base, graph = _load(bundle, trunk="base"), _load(bundle, trunk="graph")
    try:
        group, ref = on_base.arms["a"].group, graph.arms["a"].group
        assert group.on_base and group.trunk is None  # the trunk graph is not even loaded
        assert not ref.on_base and ref.trunk is not None
        c1 = graph.generate("Tell me a story.", weights={"a": 0.8, "b": 0.5}, **kw)
        c2 = on_base.generate("Tell me a story.", weights={"a": 0.8, "b": 0.5}, **kw)
        assert c1.tokens == c2.tokens
        for r1, r2 in zip(c1.records, c2.records):
            for k in ("a", "b"):
                assert r2.arm_contrib[k] == pytest.approx(r1.arm_contrib[k], abs=2e-3)
        # step by step on one sequence (a random tiny model's near-flat distributions make sampled
        # paths fork on rounding): 'b' off for the first steps, then on: its head catches up
        # from the base's rows
        on_base.reset()
        graph.reset()
        ids = [1, 520, 33, 901, 7]
        on_base.base.prefill(ids)
        pairs = [(group.run("prefill", ids, ["a"]), ref.run("prefill", ids, ["a"]))]
        for i, t in enumerate([40, 4000, 12, 77, 3000, 5]):
            names = ["a"] if i < 3 else ["a", "b"]
            on_base.base.step(t)
            pairs.append((group.run("step", t, names), ref.run("step", t, names)))
        for got, want in pairs:  # llama.cpp keeps its KV cache in f16: ~1e-3 on the layer's rows
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-2)
                assert np.abs(got[k] - want[k]).mean() < 2e-3
    finally:
        on_base.close()
        graph.close()


def test_auto_taps_only_a_bundle_that_records_a_passed_gate_for_its_base(tapped, tmp_path):
    bundle, untapped, _ = tapped
    e = _load(bundle)  # auto
    assert e.arms["a"].group.on_base
    e.close()
    e = _load(untapped)  # no record: the trunk graph
    assert not e.arms["a"].group.on_base
    e.close()
    with pytest.raises(ConfigError, match="export base-tap"):
        _load(untapped, trunk="base")
    # a record made for another base file (its sha256) is not used
    stale = tmp_path / "stale"
    shutil.copytree(bundle, stale)
    m = json.loads((stale / "manifest.json").read_text())
    next(iter(m["trunks"].values()))["base_tap"]["base_sha256"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(m))
    e = _load(stale)
    assert not e.arms["a"].group.on_base
    e.close()
    with pytest.raises(ConfigError, match="--trunk"):
        _load(stale, trunk="nonsense")


def test_a_base_of_another_init_fails_the_gate_or_is_refused(tapped, tmp_path, tiny_bundle):
    from edge_genarm.export.base_tap import base_tap
    from edge_genarm.export.bundle_write import file_record
    from edge_genarm.export.converter import convert_hf_to_gguf

    from edge_genarm.manifest import read_manifest, write_manifest

    from .tiny import build_tiny_hf

    def with_base(gguf, name):
        dst = tmp_path / name
        shutil.copytree(tapped[1], dst)
        shutil.copy(gguf, dst / "base.gguf")
        m = read_manifest(dst)
        m["files"]["base.gguf"] = file_record(dst / "base.gguf")
        write_manifest(dst, m)
        return dst

    # 2 layers against a trunk cut from a 3-layer model: refused, naming both
    two = with_base(tiny_bundle / "base.gguf", "two_layers")
    with pytest.raises(BundleError, match="3-layer model.*2 layers"):
        base_tap(two, log=lambda s: None)
    # the same shape, another init: measured, recorded as failed, and the loader keeps the graph
    build_tiny_hf(tmp_path / "hf_other", seed=8, layers=3)
    convert_hf_to_gguf(tmp_path / "hf_other", tmp_path / "other.gguf", "f32")
    other = with_base(tmp_path / "other.gguf", "other_init")
    lines = []
    rec = base_tap(other, log=lines.append)
    assert not rec["passed"] and rec["hidden_cos_mean"] < 0.9
    assert any("REFUSED" in s for s in lines)
    assert read_manifest(other)["trunks"][next(iter(read_manifest(other)["trunks"]))]["base_tap"]["passed"] is False
    e = _load(other)
    assert not e.arms["a"].group.on_base
    e.close()


def test_without_a_c_compiler_auto_keeps_the_graph_and_base_names_the_cause(tapped, monkeypatch, tmp_path):
    from edge_genarm.backends import capture

    bundle, _, _ = tapped
    monkeypatch.setenv("EDGE_GENARM_CACHE", str(tmp_path / "cache"))  # no compiled callback cached
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(capture, "_LIB", None)
    e = _load(bundle)
    assert not e.arms["a"].group.on_base
    e.close()
    with pytest.raises(ConfigError, match="eval callback compiled.*no-such-cc"):
        _load(bundle, trunk="base")


def test_export_base_tap_command(tapped, tmp_path):
    from click.testing import CliRunner

    from edge_genarm.cli import main

    dst = tmp_path / "b"
    shutil.copytree(tapped[1], dst)
    r = CliRunner().invoke(main, ["export", "base-tap", str(dst)])
    assert r.exit_code == 0, r.output
    assert "run on the base's layer 1 output" in r.output
    assert "base tap, ARM 'a'" in r.output and "passed" in r.output
