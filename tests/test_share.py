"""Sibling ARMs on one shared trunk, and int4/int8 ARMs: exact against the whole graphs and
PyTorch, gated on held-out pairs, refused with their figures, bad files named."""

import json
import shutil

import numpy as np
import pytest

from edge_genarm import guidance as G
from edge_genarm.errors import BundleError, ModelFileError

torch = pytest.importorskip("torch")


def _sibling_hf(root, name, seed):
    """A 3-layer tiny LM, and a sibling: the same weights but layer 2's projections moved
    (what a LoRA adapter on the last layer does)."""
    from transformers import AutoModelForCausalLM

    from .tiny import build_tiny_hf

    base = root / "hf_init"
    if not base.exists():
        build_tiny_hf(base, seed=7, layers=3)
    m = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.model.layers[2].named_parameters():
            if "proj" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    out = root / f"hf_{name}"
    m.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special", "chat_template")):
            shutil.copy(f, out)
    return out


@pytest.fixture(scope="module")
def siblings(tiny_bundle, tmp_path_factory):
    """(full bundle, hf folders): the tiny base + sibling ARMs 'a' and 'b' as whole graphs."""
    from edge_genarm.export.bundle_write import add_arm
    from edge_genarm.export.onnx_export import export_arm_onnx

    root = tmp_path_factory.mktemp("siblings")
    full = root / "full"
    shutil.copytree(tiny_bundle, full)
    hf = {}
    for name, seed in (("a", 1), ("b", 2)):
        hf[name] = _sibling_hf(root, name, seed)
        export_arm_onnx(hf[name], root / "onnx" / name)
        add_arm(full, root / "onnx" / name, name=name, beta_r=0.1, weight=1.0)
    m = json.loads((full / "manifest.json").read_text())
    for n in ("alpha", "beta"):  # keep only the siblings
        del m["arms"][n]
        m["files"] = {k: v for k, v in m["files"].items() if not k.startswith(f"arms/{n}/")}
        shutil.rmtree(full / "arms" / n)
    (full / "manifest.json").write_text(json.dumps(m))
    return full, hf


@pytest.fixture(scope="module", params=["compact", "cut"])
def shared(siblings, tmp_path_factory, request):
    """The siblings on one trunk: rebuilt with fused ops (compact), or cut from their own nodes."""
    from edge_genarm.export.share import share_trunk

    full, _ = siblings
    dst = tmp_path_factory.mktemp("shared") / "bundle"
    shutil.copytree(full, dst)
    m = share_trunk(dst, compact=request.param == "compact")
    assert next(iter(m["trunks"].values()))["graph"] == request.param
    return dst


def _pairs_file(path, n=8):
    rows = [
        {"prompt": f"Tell me about topic {i}.", "chosen": f"Sure, topic {i} is lovely.", "rejected": "No."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shared_trunk_bundle_layout_and_manifest(shared):
    m = json.loads((shared / "manifest.json").read_text())
    (key, t), = m["trunks"].items()  # fmt: skip
    assert t["layers"] == 2 and t["n_layers"] == 3  # layers 0-1 shared, layer 2 per ARM
    for n in ("a", "b"):
        a = m["arms"][n]
        assert a["trunk"] == key and a["file"] == f"arms/{n}/head.onnx"
        assert a["gate"]["top1_agreement"] == 1.0 and a["gate"]["mean_kl"] < 1e-6
        assert not (shared / "arms" / n / "model.onnx").exists()  # the whole graph is gone
    assert all((shared / rel).is_file() for rel in m["files"])


def test_shared_trunk_generation_is_exact(siblings, shared):
    from edge_genarm import load

    full, _ = siblings
    kw = dict(max_tokens=10, seed=4, sampling=G.SamplingParams(1.0, 0, 1.0, 0.0))
    e_full, e_shared = load(str(full), n_ctx=256), load(str(shared), n_ctx=256)
    try:
        assert type(e_shared.arms["a"]).__name__ == "HeadARM"
        for w in ({"a": 0.8, "b": 0.5}, {"a": 0.0, "b": 1.2}, {"a": 1.0, "b": 0.0}):
            c1 = e_full.generate("Tell me a story.", weights=w, **kw)
            c2 = e_shared.generate("Tell me a story.", weights=w, **kw)
            assert c1.tokens == c2.tokens
            for r1, r2 in zip(c1.records, c2.records):
                assert r1.arm_contrib.keys() == r2.arm_contrib.keys()
                for k in r1.arm_contrib:
                    assert r2.arm_contrib[k] == pytest.approx(r1.arm_contrib[k], abs=1e-4)
        # a chat: 'b' off for the first turn, on for the second (its head catches up from the trunk)
        turn1 = e_shared.generate([{"role": "user", "content": "Hi"}], weights={"a": 1, "b": 0}, **kw)
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": turn1.text},
                {"role": "user", "content": "More"}]  # fmt: skip
        got = e_shared.generate(msgs, weights={"a": 1, "b": 1}, **kw)
        e_full.generate([{"role": "user", "content": "Hi"}], weights={"a": 1, "b": 0}, **kw)
        want = e_full.generate(msgs, weights={"a": 1, "b": 1}, **kw)
        assert got.tokens == want.tokens
        for r1, r2 in zip(want.records, got.records):
            assert r2.arm_contrib["b"] == pytest.approx(r1.arm_contrib["b"], abs=1e-4)
    finally:
        e_full.close()
        e_shared.close()


def test_shared_pieces_match_pytorch(shared, siblings):
    from transformers import AutoModelForCausalLM

    from edge_genarm.backends.trunk import TrunkGroup

    _, hf = siblings
    m = json.loads((shared / "manifest.json").read_text())
    t = next(iter(m["trunks"].values()))
    heads = {n: shared / m["arms"][n]["file"] for n in ("a", "b")}
    group = TrunkGroup(shared / t["file"], heads, shared / t["lm_head"])
    ids = [1, 520, 33, 901, 7, 4000]
    for n in ("a", "b"):
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(hf[n])(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(group.sequence_logits(n, ids), ref, atol=2e-4)


def test_int4_share_is_gated_on_heldout_pairs(siblings, tmp_path):
    from edge_genarm.export.share import PairSpec, share_trunk

    full, _ = siblings
    dst = tmp_path / "b"
    shutil.copytree(full, dst)
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    spec = PairSpec(pairs, max_len=64, eval_frac=0.5)
    m = share_trunk(dst, quantize="int4", pairs={"a": spec, "b": spec})
    for n in ("a", "b"):
        g = m["arms"][n]["gate"]
        assert g["pairs"] == 4 and g["type"] == "int4" and g["passed"]
        assert 0 <= g["accuracy_quantized"] <= 1 and g["mean_kl"] > 0  # it did change the numbers
        assert g["accuracy_drop"] <= 0.02
    t = next(iter(m["trunks"].values()))
    assert t["quantize"] == "int4"
    sizes = {p.name: p.stat().st_size for p in (dst / t["file"]).parent.iterdir()}
    assert sizes["trunk.onnx"] < 0.4 * (full / "arms/a/model.onnx").stat().st_size


def test_a_quantized_arm_that_fails_the_gate_is_refused_and_the_bundle_unchanged(
    siblings, tmp_path, monkeypatch
):
    from edge_genarm.export import gate
    from edge_genarm.export.share import PairSpec, share_trunk

    from edge_genarm.bundle import sha256_file

    full, _ = siblings
    dst = tmp_path / "b"
    shutil.copytree(full, dst)
    before = {p.relative_to(dst): sha256_file(p) for p in dst.rglob("*") if p.is_file()}
    monkeypatch.setattr(gate, "MAX_ACCURACY_DROP", -1.0)  # no ARM can pass
    monkeypatch.setattr(gate, "MAX_PAIRS_LOST", -1)
    spec = PairSpec(_pairs_file(tmp_path / "pairs.jsonl"), max_len=64, eval_frac=0.5)
    with pytest.raises(BundleError, match=r"failed the int4 gate.*accuracy .* fp32 -> .*unchanged"):
        share_trunk(dst, quantize="int4", pairs={"a": spec, "b": spec})
    after = {p.relative_to(dst): sha256_file(p) for p in dst.rglob("*") if p.is_file()}
    assert after == before


def test_a_head_whose_trunk_is_missing_or_foreign_is_refused(shared, tmp_path):
    from edge_genarm import load

    dst = tmp_path / "b"
    shutil.copytree(shared, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["arms"]["a"]["trunk"] = "0123456789abcdef"
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        BundleError, match=r"'a' \('arms/a/head.onnx'\) is a head on trunk '0123456789abcdef', which the manifest"
    ):
        load(str(dst), verify=False)
    # a trunk cut from another init: the graphs' own stamps differ
    import onnx

    m = json.loads((shared / "manifest.json").read_text())
    t = next(iter(m["trunks"].values()))
    trunk = onnx.load(str(dst / t["file"]))
    for p in trunk.metadata_props:
        if p.key == "edge_genarm_trunk":
            p.value = "ffffffffffffffff"
    onnx.save_model(trunk, str(dst / t["file"]))
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFileError, match=r"head.onnx' was cut from another init than its trunk"):
        load(str(dst), verify=False)


def test_one_arm_cut_at_a_given_layer(siblings, tmp_path):
    """One ARM has no sibling to find its trunk by: it is cut where its training began (--layer),
    its pieces still match PyTorch; no layer, or one past where siblings differ, is refused."""
    from edge_genarm.export.share import share_trunk
    from transformers import AutoModelForCausalLM

    from edge_genarm.backends.trunk import TrunkGroup

    full, hf = siblings
    for layer, names in ((None, ["a"]), (3, ["a"]), (0, ["a"]), (3, None)):
        dst = tmp_path / f"refused{layer}{names}"
        shutil.copytree(full, dst)
        with pytest.raises(BundleError, match="--layer"):
            share_trunk(dst, names, layer=layer)
        assert "trunks" not in json.loads((dst / "manifest.json").read_text())
    dst = tmp_path / "one"
    shutil.copytree(full, dst)
    m = share_trunk(dst, ["a"], layer=1)
    (t,) = m["trunks"].values()
    assert t["layers"] == 1 and t["n_layers"] == 3 and "trunk" not in m["arms"]["b"]
    group = TrunkGroup(dst / t["file"], {"a": dst / m["arms"]["a"]["file"]}, dst / t["lm_head"])
    ids = [1, 520, 33, 901, 7, 4000]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf["a"])(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(group.sequence_logits("a", ids), ref, atol=2e-4)


def test_siblings_that_differ_everywhere_cannot_share(tiny_bundle, tmp_path):
    from edge_genarm.export.share import share_trunk

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)  # alpha and beta: two unrelated random models
    with pytest.raises(BundleError, match="no shared trunk"):
        share_trunk(dst)


def test_quantize_refuses_a_quantized_graph_and_one_without_weights(tmp_path):
    import onnx
    from edge_genarm.export.quantize import quantize_model
    from onnx import TensorProto, helper, numpy_helper

    e = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32), "E")
    # a tied LM head: logits = Gather(E, ids) @ Transpose(E)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Et"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "n", 64])], [e],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q = quantize_model(model, "int4")
    ops = [n.op_type for n in q.graph.node]
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops and "Transpose" not in ops
    assert all(i.data_type != TensorProto.FLOAT or i.name.endswith("scales") for i in q.graph.initializer)
    with pytest.raises(BundleError, match="already quantized .*MatMulNBits"):
        quantize_model(q, "int4")
    plain = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "no-weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    with pytest.raises(BundleError, match="no MatMul with a constant weight"):
        quantize_model(helper.make_model(plain), "int4")
    onnx.checker.check_model(q)


def test_bundle_inspect_shows_the_trunk_and_the_gate(shared):
    from edge_genarm.export.commands import inspect_bundle

    text = inspect_bundle(shared)
    assert "layers 0-1 of 3" in text and "head on trunk" in text
    assert text.count("gate (f32): KL") == 2


def test_the_gate_allows_0_02_or_one_pair():
    from edge_genarm.export.gate import within_gate

    assert within_gate(1 / 17, 17) and not within_gate(2 / 17, 17)  # one pair of 17 is noise, two are not
    assert within_gate(2 / 120, 120) and not within_gate(3 / 120, 120)  # 120 pairs: the 0.02 rule
    assert within_gate(-0.05, 20) and not within_gate(0.5, 0)
