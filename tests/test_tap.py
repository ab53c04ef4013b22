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


def test_the_fast_mode_restricts_the_heads_lm_head_to_the_base_candidates(tapped, monkeypatch):
    """A Partial from the heads' LM head holds the full head's logits on the asked ids, and the
    combine over it is the exact combine on those ids up to one constant, -inf elsewhere."""
    from edge_genarm import fastmode
    from edge_genarm.backends.units import Partial
    from edge_genarm.generation import combine

    bundle, _, _ = tapped
    e = _load(bundle, trunk="base")
    try:
        w = {"a": 0.8, "b": -0.5}  # a negative weight too: tokens past the ids must still be -inf
        runs = e.units_for(w)
        seq = [1, 520, 33, 901, 7, 4000, 12]
        base_logits, _ = e.forward("prefill", seq, ([], []))
        lp = G.log_softmax(base_logits)
        ids = G.top_k_ids(lp, 16)
        full = e.forward_units("prefill", seq, runs[0] + runs[1])
        part = e.forward_units("prefill", seq, runs[0] + runs[1], ids=ids)
        for k in w:
            assert isinstance(part[k], Partial) and not isinstance(full[k], Partial)
            np.testing.assert_array_equal(part[k].ids, ids)
            np.testing.assert_allclose(part[k].z, full[k][ids], rtol=1e-5, atol=1e-4)  # numpy vs ORT, fp32
        exact = combine((base_logits, full), w, "base")
        fast = combine((base_logits, part), w, "base")
        assert np.isfinite(fast.scores).sum() == len(ids) and np.isfinite(fast.scores[ids]).all()
        shift = exact.scores[ids] - fast.scores[ids]
        np.testing.assert_allclose(shift, shift[0], atol=1e-3)  # one constant: the ARMs' logZ over all ids
        # the record of a picked token: its ARM terms over the candidates' normalizer
        tok = int(ids[np.argmax(fast.scores[ids])])
        assert fast.arm_term(tok, w) == pytest.approx(exact.arm_term(tok, w) - shift[0], abs=2e-3)
        # end to end: every step guided (tau below any entropy), 8 candidates
        monkeypatch.setattr(fastmode, "FAST_TAU", -1.0)
        monkeypatch.setattr("edge_genarm.generation.FAST_CANDIDATES", 8)
        seen = []
        c = e.generate("Tell me a story.", max_tokens=8, seed=3, weights=w, exact=False,
                       sampling=G.SamplingParams(1.0, 0, 1.0, 0.0), on_step=lambda i, s, p: seen.append(s.copy()))  # fmt: skip
        assert all(r.guided for r in c.records) and len(seen) == 8
        assert np.isfinite(seen[0]).sum() > 8  # the prompt's step runs the whole head
        eos = e.eos_candidates
        assert eos.size and all(np.isfinite(s).sum() <= 8 + eos.size for s in seen[1:])  # then only the candidates
        assert all(np.isfinite(s[eos]).all() for s in seen[1:])  # and the end of the reply, always
        assert all(t in np.flatnonzero(np.isfinite(s)) for t, s in zip(c.tokens[1:], seen[1:]))
    finally:
        e.close()
