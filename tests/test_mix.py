"""The mix head (issue 21): one head for every weight vector of a pack's objectives.

Its graph (export/compact.py, export/lean_mix.py) and its training module (export/train_mix.py)
are checked against a numpy forward of the base with the gated LoRAs merged at the same alpha
(an independent computation); the runtime unit (backends/mix.py) against the same numpy
forward through a real llama.cpp base tap; and the fast mode's choice of it, its refusals, and
its cache across weight changes end to end."""

import json
import logging

import numpy as np
import pytest

from edge_genarm import guidance as G

torch = pytest.importorskip("torch")


def _random_mix(base, first: int, n_obj: int = 2, rank: int = 4, seed: int = 0, size: float = 0.05):
    rng = np.random.default_rng(seed)
    lora = {}
    for i in range(first, len(base.layers)):
        for key in ("q", "k", "v", "o", "gate", "up", "down"):
            d_in, d_out = base.layers[i][key].shape
            a = rng.normal(0, 1 / np.sqrt(d_in), (n_obj * rank, d_in)).astype(np.float32)
            b = rng.normal(0, size, (d_out, n_obj * rank)).astype(np.float32)
            lora[(i, key)] = (a, b)
    info = {"objectives": ["a", "b"][:n_obj], "first_layer": first, "rank": rank, "scale": 2.0}
    return info, lora


def _write_mix(folder, info, lora):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    k = info["first_layer"]
    arrays = {}
    for (i, key), (a, b) in lora.items():
        arrays[f"{i - k}_{key}.A"] = a.astype(np.float16)
        arrays[f"{i - k}_{key}.B"] = b.astype(np.float16)
    save_file(arrays, str(folder / "mix.safetensors"))
    (folder / "mix.json").write_text(json.dumps(info))
    from edge_genarm.export.lean_mix import read_mix

    return read_mix(folder)  # the float16-rounded weights, as a pack reads them


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from edge_genarm.export.compact import LlamaWeights

    rng = np.random.default_rng(1)
    d, ff, v, heads, kv = 64, 96, 97, 4, 2  # GroupQueryAttention wants head_size % 16 == 0
    hd = d // heads

    def m(i, o):
        return rng.normal(0, 0.2, (i, o)).astype(np.float32)

    layers = [{"q": m(d, d), "k": m(d, kv * hd), "v": m(d, kv * hd), "o": m(d, d), "gate": m(d, ff), "up": m(d, ff),
               "down": m(ff, d), "ln1": 1 + rng.normal(0, 0.1, d).astype(np.float32),
               "ln2": 1 + rng.normal(0, 0.1, d).astype(np.float32)} for _ in range(3)]  # fmt: skip
    inv = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    return LlamaWeights(m(v, d), layers, np.ones(d, np.float32), m(d, v), inv, 1e-5, heads, kv)


@pytest.mark.parametrize("alpha", [[1.0, 0.0], [0.3, 0.7]])
def test_the_mix_graph_is_the_base_with_the_loras_merged_at_alpha(tiny_weights, tmp_path, alpha):
    from edge_genarm.export.lean_mix import head_logits, merged_at, mix_graph
    from edge_genarm.export.numpy_build import numpy_forward
    from edge_genarm.export.onnx_io import save_model

    w = tiny_weights
    info, lora = _random_mix(w, 1)
    save_model(mix_graph(w, info, lora, {"part": "mix"}), tmp_path / "mix.onnx")
    ids = [3, 17, 5, 60, 2, 90, 41]
    hidden = numpy_forward(w, ids, upto=1)
    got = head_logits(tmp_path / "mix.onnx", hidden, alpha, w.lm_head)
    ref = numpy_forward(merged_at(w, info, lora, alpha), ids)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    plain = numpy_forward(w, ids)
    assert np.abs(ref - plain).max() > 1e-2  # the LoRAs do change the logits: the check above can fail


def test_the_training_head_is_the_same_function(tiny_weights):
    """export/train_mix.py's torch head, at alpha, equals the numpy forward of the merged weights."""
    from edge_genarm.export.lean_mix import merged_at
    from edge_genarm.export.numpy_build import numpy_forward
    from edge_genarm.export.train_mix import MATRICES, _head_class

    w = tiny_weights
    info, lora = _random_mix(w, 1, seed=3)
    head = _head_class()(w.layers[1:], w.norm, w.lm_head, w.inv_freq, w.eps, w.n_heads, w.n_kv, 2, 4, 2.0)
    with torch.no_grad():
        for j in range(2):
            for key in MATRICES:
                a, b = lora[(1 + j, key)]
                head.A[f"{j}_{key}"].copy_(torch.from_numpy(a))
                head.B[f"{j}_{key}"].copy_(torch.from_numpy(b))
    ids = [3, 17, 5, 60, 2, 90, 41]
    hidden = torch.tensor(numpy_forward(w, ids, upto=1), dtype=torch.float32)[None]
    for alpha in ([1.0, 0.0], [0.25, 0.75]):
        with torch.no_grad():
            got = (head(hidden, torch.tensor(alpha)) @ head.lm)[0].double().numpy()
        np.testing.assert_allclose(got, numpy_forward(merged_at(w, info, lora, alpha), ids), atol=2e-4, rtol=1e-4)
    with torch.no_grad():  # alpha None: the LoRAs off, the base itself
        got = (head(hidden, None) @ head.lm)[0].double().numpy()
    np.testing.assert_allclose(got, numpy_forward(w, ids), atol=2e-4, rtol=1e-4)


def _peft_adapter(folder, lora: dict, rank: int):
    """A peft-style LoRA folder (what train-arm commits) holding `lora` {(layer, key): (A, B)}."""
    from safetensors.numpy import save_file

    mods = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for (i, key), (a, b) in lora.items():
        arrays[f"base_model.model.model.layers.{i}.{mods[key]}.lora_A.weight"] = np.ascontiguousarray(a)
        arrays[f"base_model.model.model.layers.{i}.{mods[key]}.lora_B.weight"] = np.ascontiguousarray(b)
    save_file(arrays, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank, "peft_type": "LORA"}))
    return folder


def test_distillation_targets_and_loss_against_numpy(tiny_weights, tmp_path):
    """A teacher ARM built from a peft adapter is the merged ARM (numpy); the distillation loss is 0
    where the mix head equals the target mixture (a vertex, the teacher's own LoRA in its block) and
    > 0 between (weights mixed in weight space are not log-probs mixed)."""
    from edge_genarm.export.numpy_build import merge_adapter, numpy_forward
    from edge_genarm.export.train_mix import _head_class, distill_loss, teacher_head, teacher_targets

    w = tiny_weights
    info, lora = _random_mix(w, 1, seed=5, size=0.3)
    r = info["rank"]
    adapters = []
    for j in range(2):
        one = {key: (a[j * r : (j + 1) * r], b[:, j * r : (j + 1) * r]) for key, (a, b) in lora.items()}
        adapters.append(_peft_adapter(tmp_path / f"arm{j}", one, r))
    cls = _head_class()

    def make(first, rank, scale, n_obj=1):
        return cls(w.layers[first:], w.norm, w.lm_head, w.inv_freq, w.eps, w.n_heads, w.n_kv, n_obj, rank, scale)

    teachers = [teacher_head(make, a, 3) for a in adapters]
    assert [f for f, _ in teachers] == [1, 1]
    ids = [3, 17, 5, 60, 2, 90, 41, 7]
    states = [torch.tensor(numpy_forward(w, ids, upto=1), dtype=torch.float32)]
    with torch.no_grad():
        got = (teachers[0][1](states[0][None], torch.ones(1))[0] @ teachers[0][1].lm).double().numpy()
    np.testing.assert_allclose(got, numpy_forward(merge_adapter(w, adapters[0]), ids), atol=2e-4, rtol=1e-4)

    spans = [3]  # a 3-token prompt: reply positions 2..6 predict tokens 3..7
    targets = teacher_targets(states, [ids], spans, [t for _, t in teachers], [96], 8, log=lambda m: None)
    tids, valid, lp = targets[0]
    assert tids.shape == (5, 9) and lp.shape == (2, 5, 9) and valid[:, :8].all()
    base_lp = numpy_forward(w, ids)[2:7]
    base_lp = base_lp - np.log(np.exp(base_lp - base_lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - base_lp.max(-1, keepdims=True)
    for row in range(5):  # the base's 8 likeliest, then the EOS id (a duplicate when among them)
        assert set(tids[row, :8].tolist()) == set(np.argsort(-base_lp[row])[:8].tolist())
        assert int(tids[row, 8]) == 96 and bool(valid[row, 8]) == (96 not in tids[row, :8].tolist())
    student = make(1, r, 2.0, n_obj=2)
    with torch.no_grad():
        for key, (a, b) in lora.items():
            student.A[f"{key[0] - 1}_{key[1]}"].copy_(torch.from_numpy(a))
            student.B[f"{key[0] - 1}_{key[1]}"].copy_(torch.from_numpy(b))
        at_vertex = float(distill_loss(student, states, [ids], spans, targets, [0], torch.tensor([1.0, 0.0])))
        between = float(distill_loss(student, states, [ids], spans, targets, [0], torch.tensor([0.5, 0.5])))
    assert at_vertex < 1e-5 < 1e-3 < between


def test_draw_alpha_stays_on_the_simplex():
    import random

    from edge_genarm.export.train_mix import draw_alpha

    rng = random.Random(0)
    draws = [draw_alpha(2, rng) for _ in range(400)]
    assert all(min(a) >= 0 and abs(sum(a) - 1) < 1e-9 for a in draws)
    vertices = sum(max(a) == 1.0 for a in draws)
    assert 60 < vertices < 140  # about one in four
    assert len({round(a[0], 3) for a in draws}) > 100  # and spread between


def _mixed_bundle(tapped, factory, name: str, size: float, share: dict, heldout: bool = False):  # noqa: F811
    """A copy of the tapped tiny bundle with a random mix head built by the pack's mix stage:
    (bundle, (mix.json, LoRAs), the base's weights, the stage's manifest record). `heldout`: the
    recipe has held-out pairs (random ids) for the merge's calibration and ends check."""
    import shutil

    from edge_genarm.export.lean_mix import mix_stage, read_mix
    from edge_genarm.export.lean_pack import base_weights

    bundle, _, _ = tapped
    root = factory.mktemp(name)
    out = root / "bundle"
    shutil.copytree(bundle, out)
    base = base_weights(out / "base.gguf")
    info, lora = _random_mix(base, 2, size=size)
    _write_mix(root / "recipe" / "adapters" / "mix", info, lora)
    if heldout:
        rng = np.random.default_rng(5)
        ids = lambda n: [int(x) for x in rng.integers(100, 1000, n)]  # noqa: E731
        pairs = {o: {"pairs": [[ids(8), ids(int(rng.integers(6, 20))), ids(int(rng.integers(6, 20)))] for _ in range(6)]}
                 for o in ("a", "b")}  # fmt: skip
        (root / "recipe" / "heldout.json").write_text(json.dumps({"arms": pairs}))
    recipe = {"_dir": root / "recipe", "mix": {"adapter": "adapters/mix"}, "share": share}
    rec = mix_stage(out, out / "base.gguf", recipe, log=lambda s: None)
    return out, read_mix(root / "recipe" / "adapters" / "mix"), base, rec


@pytest.fixture(scope="module")
def mixed(tapped, tmp_path_factory):  # noqa: F811
    """The tapped tiny bundle (tests/test_tap.py: heads on layer 2, tap at layer 1) + a mix head on layer 2."""
    out, mix, base, rec = _mixed_bundle(tapped, tmp_path_factory, "mix", 0.02, {"quantize": []})
    assert rec["tap_layer"] == 1 and rec["objectives"] == ["a", "b"] and rec["parity"]["mean_kl"] < 1e-3
    return out, mix, base


def _load(bundle, **kw):
    from edge_genarm import load

    return load(str(bundle), n_ctx=256, trunk="base", **kw)


def test_the_mix_unit_on_the_base_tap_matches_numpy(mixed):
    from edge_genarm.export.lean_mix import merged_at
    from edge_genarm.export.numpy_build import numpy_forward

    bundle, (info, lora), base = mixed
    e = _load(bundle)
    try:
        assert e.mix is not None and e.mix.objectives == ("a", "b")
        seq = [1, 520, 33, 901, 7, 4000, 12, 88]
        for alpha in ([0.5, 0.5], [0.9, 0.1], [0.5, 0.5]):  # a change of alpha empties the head's cache
            e.mix.set_alpha(np.array(alpha, np.float32))
            e.base.prefill(seq[:-3])
            e.mix.prefill(seq[:-3])
            for t in seq[-3:]:
                e.base.step(t)
                got = e.mix.step(t)["mix"]
            ref = numpy_forward(merged_at(base, info, lora, alpha), seq)[-1]
            np.testing.assert_allclose(G.log_softmax(got), G.log_softmax(ref), atol=2e-3)
    finally:
        e.close()


def test_the_fast_mode_runs_the_mix_head_and_refuses_what_it_was_not_trained_on(mixed, monkeypatch, caplog):
    from edge_genarm import fastmode

    bundle, _, _ = mixed
    monkeypatch.setattr(fastmode, "FAST_TAU", -1.0)  # every step guided
    e = _load(bundle)
    try:
        sp = G.SamplingParams(1.0, 0, 1.0, 0.0)
        c = e.generate("Tell me a story.", max_tokens=6, seed=3, weights={"a": 0.6, "b": 0.4}, exact=False, sampling=sp)
        assert c.records and all(set(r.arm_contrib) == {"mix"} for r in c.records)
        assert "mix" in c.timings.arm_s and c.weights == {"a": 0.6, "b": 0.4}
        exact = e.generate("Tell me a story.", max_tokens=6, seed=3, weights={"a": 0.6, "b": 0.4}, exact=True, sampling=sp)
        assert all(set(r.arm_contrib) == {"a", "b"} for r in exact.records)  # the exact mode: the separate ARMs
        with caplog.at_level(logging.WARNING, logger="edge_genarm"):
            neg = e.generate("Tell me a story.", max_tokens=4, seed=3, weights={"a": 0.8, "b": -0.5}, exact=False,
                             sampling=sp)  # fmt: skip
        assert all(set(r.arm_contrib) == {"a", "b"} for r in neg.records)
        assert "negative weights (b=-0.5)" in caplog.text and "separate ARMs" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edge_genarm"):  # the same reason: said once per engine
            e.generate("Tell me a story.", max_tokens=2, seed=3, weights={"a": 0.8, "b": -0.5}, exact=False, sampling=sp)
        assert "negative weights" not in caplog.text
        # the same request again gives the same text: the head's cache follows alpha
        again = e.generate("Tell me a story.", max_tokens=6, seed=3, weights={"a": 0.6, "b": 0.4}, exact=False, sampling=sp)
        assert again.tokens == c.tokens
    finally:
        e.close()


def test_mix_plan_scales_and_refuses():
    from edge_genarm.backends.mix import MixUnit

    u = MixUnit.__new__(MixUnit)
    u.objectives = ("positive", "concise")
    alpha, s = u.plan({"positive": 0.5, "concise": 0.5})
    assert s == 1.0 and alpha.tolist() == [0.5, 0.5]
    alpha, s = u.plan({"positive": 2.0})
    assert s == 2.0 and alpha.tolist() == [1.0, 0.0]
    assert "not helpful" in u.plan({"positive": 1.0, "helpful": 1.0})
    assert "negative weights (concise=-1)" in u.plan({"positive": 1.0, "concise": -1.0})


from tests.test_tap import tapped  # noqa: E402,F401  (the module fixture, shared)


def _opposed_pairs(path, chosen_end: str, rejected_end: str, n: int = 24, seed: int = 0):
    import random

    words = "apple river cloud stone lamp music garden window paper bridge".split()
    r = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            body = " ".join(r.choice(words) for _ in range(3))
            f.write(json.dumps({"prompt": f"Say something {i}", "chosen": f"{body} {chosen_end}",
                                "rejected": f"{body} {rejected_end}"}) + "\n")  # fmt: skip
    return path


def test_train_mix_end_to_end_conditions_on_alpha_and_resumes(tmp_path, monkeypatch, capsys):
    """train_mix on a tiny model and two opposed objectives (one prefers replies ending 'yes', the
    other 'no'): at each objective's vertex the head prefers that objective's replies on held-out
    pairs (one head, two opposite behaviours: the conditioning works); the folder reads back as a
    pack reads it; a run killed after its first epoch resumes from the checkpoint to the same head;
    and distillation from two ARM adapters lowers the held-out KL to their mixture."""
    from edge_genarm.export import train_mix as T
    from edge_genarm.export.lean_mix import read_mix

    from .tiny import build_tiny_hf

    hf = build_tiny_hf(tmp_path / "hf", seed=3, layers=3)
    objs = [T.ObjectiveData("yes", _opposed_pairs(tmp_path / "yes.jsonl", "yes", "no"), beta_r=0.5, eval_frac=0.25),
            T.ObjectiveData("no", _opposed_pairs(tmp_path / "no.jsonl", "no", "yes", seed=1), beta_r=0.5, eval_frac=0.25)]
    kw = dict(layers=2, rank=4, epochs=3, lr=5e-2, batch_size=6, seed=0, log=lambda *_: None)
    info = T.train_mix(objs, hf, tmp_path / "a", **kw)
    init = info["held_out_init"]
    assert init["yes"]["accuracy"] + init["no"]["accuracy"] == pytest.approx(1.0)  # the init prefers one ending
    assert info["held_out"]["vertex yes"]["yes"]["accuracy"] == 1.0
    assert info["held_out"]["vertex no"]["no"]["accuracy"] == 1.0
    assert info["held_out"]["vertex yes"]["no"]["accuracy"] <= 0.5 >= info["held_out"]["vertex no"]["yes"]["accuracy"]
    got_info, lora = read_mix(tmp_path / "a")
    assert got_info["first_layer"] == 1 and {k for k, _ in lora} == {1, 2} and len(lora) == 14
    assert not (tmp_path / "a" / "checkpoint.partial").exists()

    real, epochs = T._Fit.save, []

    def dies_after_first(self, epoch):
        real(self, epoch)
        epochs.append(epoch)
        raise KeyboardInterrupt

    monkeypatch.setattr(T._Fit, "save", dies_after_first)
    with pytest.raises(KeyboardInterrupt):
        T.train_mix(objs, hf, tmp_path / "b", **kw)
    monkeypatch.setattr(T._Fit, "save", real)
    lines = []
    again = T.train_mix(objs, hf, tmp_path / "b", **{**kw, "log": lines.append})
    assert epochs == [1] and "resuming after epoch 1" in lines
    a, b = read_mix(tmp_path / "a")[1], read_mix(tmp_path / "b")[1]
    for key in a:
        for x, y in zip(a[key], b[key]):
            np.testing.assert_allclose(x, y, atol=2e-3)
    assert again["held_out"] == info["held_out"]

    # distillation: two ARM adapters (peft folders) on the last two layers, rank 4
    rng = np.random.default_rng(5)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf)
    d, ff = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q": (d, d), "k": (d, d * cfg.num_key_value_heads // cfg.num_attention_heads),
              "v": (d, d * cfg.num_key_value_heads // cfg.num_attention_heads), "o": (d, d),
              "gate": (d, ff), "up": (d, ff), "down": (ff, d)}  # fmt: skip
    adapters = {}
    for name in ("yes", "no"):
        lora = {(i, k): (rng.normal(0, 0.3, (4, s[0])).astype(np.float32), rng.normal(0, 0.3, (s[1], 4)).astype(np.float32))
                for i in (1, 2) for k, s in shapes.items()}  # fmt: skip
        adapters[name] = _peft_adapter(tmp_path / f"arm-{name}", lora, 4)
    dist = T.train_mix(objs, hf, tmp_path / "c", **{**kw, "distill": adapters, "candidates": 16})
    first, last = dist["curve"][0]["held_out_kl"], dist["curve"][-1]["held_out_kl"]
    assert all(last[k] < 0.7 * first[k] for k in first), (first, last)


def test_the_in_place_kv_cache_is_bit_for_bit_the_copying_one(tiny_weights, tmp_path):
    """A compact graph's cache is one buffer per layer that GroupQueryAttention appends to
    (backends.onnx_arm.KVGraph): through a prefill, steps, a rewind, a batch and enough steps to
    grow the buffer twice, every output equals the copying cache's bit for bit."""
    from edge_genarm.export.lean_mix import mix_graph
    from edge_genarm.export.onnx_io import save_model

    from edge_genarm.backends import onnx_arm
    from edge_genarm.backends.mix import _MixGraph

    w = tiny_weights
    info, lora = _random_mix(w, 1)
    save_model(mix_graph(w, info, lora, {}), tmp_path / "mix.onnx")
    hidden = np.random.default_rng(2).normal(0, 1, (1, 700, w.embed.shape[1])).astype(np.float32)
    extra = {"alpha": np.array([0.3, 0.7], np.float32)}
    outs, caps = [], []
    for in_place in (True, False):
        g = _MixGraph(tmp_path / "mix.onnx", "mix", cache=False)
        g._inplace = in_place and g._inplace
        assert g._inplace == in_place  # a compact graph takes the in-place cache
        o = [g.feed(list(range(40)), hidden[:, :40], extra=extra)]
        o += [g.feed([i], hidden[:, i : i + 1], extra=extra) for i in range(40, 300)]
        g.truncate(100)
        o.append(g.feed(list(range(100, 104)), hidden[:, 100:104], extra=extra))
        o += [g.feed([i], hidden[:, i : i + 1], extra=extra) for i in range(104, 600)]
        outs.append(np.concatenate([x.reshape(-1) for x in o]))
        caps.append({k: v.shape[2] for k, v in g._kv.items()})
    assert np.array_equal(outs[0], outs[1])
    assert set(caps[0].values()) == {1024} and caps[1] == {}  # 256 -> 512 -> 1024 positions
    assert onnx_arm.KV_BLOCK == 256


# --- the mix head merged at each alpha (backends/mix_merge.py) --------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_blocks_is_what_matmulnbits_reads(bits):
    """Our int4/int8 blocks, run by onnxruntime's MatMulNBits (fp32 compute), give x @ W with W
    dequantized by hand from the same bytes; and W is the input within a step."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_genarm.backends.mix_merge import dequantize_blocks, quantize_blocks

    rng = np.random.default_rng(bits)
    n, k, block = 48, 80, 32  # K not a multiple of the block: the last block is padded
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s = quantize_blocks(w, bits, block)
    nb = -(-k // block)
    assert q.shape == (n, nb, block * bits // 8) and s.shape == (n, nb)
    codes = np.stack([q & 0xF, q >> 4], -1).reshape(n, nb, block) if bits == 4 else q
    deq = ((codes.astype(np.float32) - (1 << (bits - 1))) * s[..., None]).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(dequantize_blocks(q, s, bits, k), deq)
    step = np.repeat(np.abs(s), block, 1)[:, :k]
    # half a step, but for values of the peak's opposite sign past the top code (one step at most)
    err = np.abs(deq - w)
    assert np.all(err <= step + 1e-6) and np.mean(err <= step / 2 + 1e-6) > 0.9
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=0)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq.T, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mixed_int4(tapped, tmp_path_factory):  # noqa: F811
    """The `mixed` bundle with its mix head quantized to int4, as the default pack's; LoRAs the
    size of the default pack's beside their weights (|delta| / |W| ~0.1 at a vertex; the default
    pack's: median 0.05, largest 0.10)."""
    out, mix, base, rec = _mixed_bundle(tapped, tmp_path_factory, "mix4", 0.004, {"quantize": ["int4"], "block_size": 32})
    assert rec["quantize"] == "int4" and rec["merged"]["passed"] and 0 < rec["merged"]["kl_to_fp32"] < 0.25
    return out, mix, base


def test_the_merged_int4_head_is_the_float_head_quantized_once(mixed_int4, tmp_path, caplog):
    """At each alpha the fast mode runs the head with the LoRAs merged into the base's float
    weights and quantized once: over 40 positions its KL to the float head (numpy, merged) is the
    shipped int4 head's (LoRAs beside the int4 weights); its graph has no LoRA node and no alpha
    input; the engine runs it, and returning to an alpha reuses its merged head."""
    from edge_genarm.export.lean_mix import head_logits, merged_at
    from edge_genarm.export.numpy_build import numpy_forward
    from edge_genarm.export.onnx_io import save_model

    from edge_genarm.backends.mix import _MergedGraph
    from edge_genarm.backends.mix_merge import merged_model, projections

    bundle, (info, lora), base = mixed_int4
    shipped = bundle / "mix" / "mix.onnx"
    seq = [int(t) for t in np.random.default_rng(5).integers(3, 4000, 40)]
    hidden = numpy_forward(base, seq, upto=2)
    mean_kl = lambda p, q: float(np.mean(np.sum(np.exp(p) * (p - q), -1)))  # noqa: E731
    lsm = lambda z: np.stack([G.log_softmax(r) for r in z])  # noqa: E731
    no_lora = None
    for alpha in ([0.0, 0.0], [1.0, 0.0], [0.3, 0.7], [0.0, 1.0]):
        m = merged_model(shipped, bundle / "base.gguf", np.array(alpha, np.float32))
        ops = [n.op_type for n in m.graph.node]
        assert not projections(m.graph) and "MatMul" not in ops and ops.count("MatMulNBits") == 7
        assert "alpha" not in [i.name for i in m.graph.input]
        save_model(m, tmp_path / "merged.onnx")
        ref = lsm(numpy_forward(merged_at(base, info, lora, alpha), seq))
        got = lsm(head_logits(tmp_path / "merged.onnx", hidden, alpha, base.lm_head))
        ship = lsm(head_logits(shipped, hidden, alpha, base.lm_head))
        kl_got, kl_ship = mean_kl(ref, got), mean_kl(ref, ship)
        assert kl_got <= 1.5 * kl_ship + 1e-4, (alpha, kl_got, kl_ship)
        if alpha == [0.0, 0.0]:  # no LoRA: the same weights quantized as onnxruntime's quantizer did
            assert kl_got == pytest.approx(kl_ship, rel=0.2, abs=1e-4)
            no_lora = got
        else:  # the LoRAs are in it: nearer the float head at alpha than the head without them
            assert kl_got < mean_kl(ref, no_lora), (alpha, kl_got, mean_kl(ref, no_lora))
    e = _load(bundle, merge_mix=True)
    try:
        with caplog.at_level(logging.WARNING, logger="edge_genarm"):
            for alpha in ([1.0, 0.0], [0.3, 0.7], [0.5, 0.5], [1.0, 0.0]):
                e.mix.set_alpha(np.array(alpha, np.float32))
                assert isinstance(e.mix.graph, _MergedGraph)
                e.base.prefill(seq[:-2])
                e.mix.prefill(seq[:-2])
                for t in seq[-2:]:
                    e.base.step(t)
                    out = e.mix.step(t)["mix"]
                m = merged_model(shipped, bundle / "base.gguf", np.array(alpha, np.float32))
                save_model(m, tmp_path / "merged.onnx")
                want = head_logits(tmp_path / "merged.onnx", hidden, alpha, base.lm_head)[-1]
                # (the engine's hidden states are llama.cpp's, rounded to int8 per block by the
                # int4 kernel, and its LM head the pack's graph: the test's are numpy's and float)
                np.testing.assert_allclose(G.log_softmax(out), G.log_softmax(want), atol=3e-2)
                assert np.argmax(out) == np.argmax(want)
        assert "runs as shipped" not in caplog.text
        assert len(e.mix._merged) == 3  # [1, 0] came back: kept with its cache, not merged again
    finally:
        e.close()
    e = _load(bundle, merge_mix=False)  # --no-merge-mix: never merged
    try:
        assert isinstance(e.mix.merge, str) and "--no-merge-mix" in e.mix.merge
        e.mix.set_alpha(np.array([0.5, 0.5], np.float32))
        assert e.mix.graph is e.mix.shipped and not e.mix._merged
    finally:
        e.close()
    e = _load(bundle)  # by default only a head whose ends of replies the build checked (this one's were not)
    try:
        assert isinstance(e.mix.merge, str) and "ends of replies" in e.mix.merge
    finally:
        e.close()


def test_merge_options_int8_projections_kept_loras_and_the_mean_error_as_bias(mixed_int4, tmp_path):
    """scripts/eos_study.py's variants of the merge: `bits` quantizes the named projections in
    int8, `keep` leaves their LoRAs beside them (the graph keeps its alpha input), and `x_mean`
    adds the mean output error back as MatMulNBits' bias: at an input equal to that mean the
    merged projection then gives the float one."""
    from onnx import numpy_helper

    from edge_genarm.backends.mix_merge import _key, dequantize_blocks, merged_model, projections

    bundle, _, _ = mixed_int4
    shipped = bundle / "mix" / "mix.onnx"
    import onnx

    keys = [_key(p["A"]) for p in projections(onnx.load(str(shipped)).graph)]
    first, last = keys[0], keys[-1]
    alpha = np.array([0.3, 0.7], np.float32)
    m = merged_model(shipped, bundle / "base.gguf", alpha, bits={first: 8}, keep={last})
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in nodes]
    assert bits.count(8) == 1 and bits.count(4) == len(nodes) - 1
    assert [_key(p["A"]) for p in projections(m.graph)] == [last] and "alpha" in {i.name for i in m.graph.input}
    # x_mean: at x = the mean, the projection with its bias is the float merged one (numpy)
    from edge_genarm.export.lean_mix import merged_at

    (info, lora), base = mixed_int4[1], mixed_int4[2]
    plain = merged_model(shipped, bundle / "base.gguf", alpha)
    node = next(n for n in plain.graph.node if n.op_type == "MatMulNBits")
    key = next(_key(p["A"]) for p in projections(onnx.load(str(shipped)).graph) if p["node"].name == node.name)
    at = {a.name: a.i for a in node.attribute}
    mean = np.random.default_rng(0).standard_normal(at["K"]).astype(np.float32)
    m = merged_model(shipped, bundle / "base.gguf", alpha, x_mean={key: mean})
    assert sum(len(n.input) > 5 for n in m.graph.node if n.op_type == "MatMulNBits") == 1
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    biased = next(n for n in m.graph.node if n.name == node.name)
    q, sc = inits[biased.input[1]], inits[biased.input[2]].reshape(at["N"], -1)
    deq = dequantize_blocks(q.reshape(at["N"], sc.shape[1], -1), sc, at["bits"], at["K"])  # (N, K)
    w = merged_at(base, info, lora, alpha).layers[key[0]][key[1]].astype(np.float64)  # (K, N)
    got = mean.astype(np.float64) @ deq.T + inits[biased.input[5]]
    np.testing.assert_allclose(got, mean.astype(np.float64) @ w, rtol=1e-4, atol=1e-4 * np.abs(mean @ w).max())
    assert np.abs(mean @ deq.T - mean @ w).max() > 10 * np.abs(got - mean @ w).max()  # the error it takes back


def test_the_merge_is_calibrated_on_held_out_pairs_and_gated_on_the_ends_of_replies(tapped, tmp_path_factory, monkeypatch):  # noqa: F811
    """With held-out pairs, the pack's build saves each projection's mean input at each vertex
    (the merge's bias), checks the merged head's ends of replies against the float head's, and
    the runtime merges with that bias by default; a merged head whose ends drift past MAX_ENDS
    is not merged."""
    from edge_genarm.export import lean_mix

    from edge_genarm.backends.mix import _MergedGraph
    from edge_genarm.backends.mix_merge import calibration_at, input_means

    bundle, _, _, rec = _mixed_bundle(tapped, tmp_path_factory, "mixc", 0.004,
                                      {"quantize": ["int4"], "block_size": 32}, heldout=True)  # fmt: skip
    merged = rec["merged"]
    assert merged["passed"] and merged["calibration"] == lean_mix.CALIB_FILE and "ends_rel_err" in merged
    assert set(merged["ends"]) == {"[1.0, 0.0]", "[0.5, 0.5]", "[0.0, 1.0]"}
    assert all(0 <= e["float"] < lean_mix.ENDS_FLOOR and "merged" not in e for e in merged["ends"].values())
    with np.load(bundle / lean_mix.CALIB_FILE) as z:
        import onnx

        from edge_genarm.backends.mix_merge import projections

        n_proj = len(projections(onnx.load(str(bundle / "mix" / "mix.onnx")).graph))
        assert n_proj >= 7 and len(z.files) == n_proj and all(z[k].shape[0] == 2 for k in z.files)
    # the means mix linearly in alpha, and the vertex's are the head's mean inputs at that vertex
    at = calibration_at(bundle / lean_mix.CALIB_FILE, [0.25, 0.75])
    v0, v1 = (calibration_at(bundle / lean_mix.CALIB_FILE, a) for a in ([1.0, 0.0], [0.0, 1.0]))
    for k in at:
        np.testing.assert_allclose(at[k], 0.25 * v0[k] + 0.75 * v1[k], rtol=1e-5, atol=1e-6)
    from edge_genarm.backends.mix_merge import MergeError

    bad = bundle.parent / "bad-calib.npz"
    bad.write_bytes((bundle / lean_mix.CALIB_FILE).read_bytes()[:100])  # truncated: named, with the fix
    with pytest.raises(MergeError, match="bad-calib.npz.*pack build"):
        calibration_at(bad, [0.5, 0.5])
    with pytest.raises(MergeError, match="rebuild the pack"):
        calibration_at(bundle / lean_mix.CALIB_FILE, [0.2, 0.3, 0.5])
    hid = [np.random.default_rng(1).standard_normal((12, next(m.size for k, m in v0.items() if k[1] == "q"))).astype(np.float32)]
    means = input_means(bundle / "mix" / "mix.onnx", hid, [0.0, 1.0])
    assert set(means) == set(v1) and all(m.shape == v1[k].shape for k, m in means.items())
    e = _load(bundle)  # the default: merged, with the bias
    try:
        assert e.mix.merge is True and e.mix.calibration == bundle / lean_mix.CALIB_FILE
        e.mix.set_alpha(np.array([0.5, 0.5], np.float32))
        assert isinstance(e.mix.graph, _MergedGraph)
        # the default mode: fast where the mix head serves the weights, exact where it cannot
        c = e.generate("Tell me a story.", max_tokens=4, seed=1, weights={"a": 0.5, "b": 0.5})
        assert c.records and all(set(r.arm_contrib) <= {"mix"} for r in c.records)
        c = e.generate("Tell me a story.", max_tokens=4, seed=1, weights={"a": -0.5, "b": 0.5})
        assert c.records and all(set(r.arm_contrib) == {"a", "b"} and r.guided for r in c.records)
    finally:
        e.close()
    # a gate that looks at every alpha and allows no drift at all: not merged
    monkeypatch.setattr(lean_mix, "ENDS_FLOOR", 0.0)
    monkeypatch.setattr(lean_mix, "MAX_ENDS", 0.0)
    _, _, _, strict = _mixed_bundle(tapped, tmp_path_factory, "mixs", 0.004,
                                    {"quantize": ["int4"], "block_size": 32}, heldout=True)  # fmt: skip
    assert strict["merged"]["kl_to_fp32"] <= lean_mix.MAX_KL and not strict["merged"]["passed"]
    assert all("merged" in e for e in strict["merged"]["ends"].values()) and strict["merged"]["ends_rel_err"] > 0


def test_a_pack_whose_merged_head_was_not_checked_runs_it_as_shipped(mixed_int4, tmp_path):
    import shutil

    from edge_genarm.manifest import read_manifest, write_manifest

    bundle = tmp_path / "b"
    shutil.copytree(mixed_int4[0], bundle)
    for merged, why in ((None, "built before merged heads were checked"), ({"kl_to_fp32": 0.4, "passed": False}, "0.400")):
        m = read_manifest(bundle)
        m["mix"].pop("merged", None)
        if merged is not None:
            m["mix"]["merged"] = merged
        write_manifest(bundle, m)
        e = _load(bundle, merge_mix=True)
        try:
            assert isinstance(e.mix.merge, str) and why in e.mix.merge
            e.mix.set_alpha(np.array([0.5, 0.5], np.float32))
            assert e.mix.graph is e.mix.shipped and "alpha" in e.mix.graph._inputs
            c = e.generate("Tell me a story.", max_tokens=4, seed=1, weights={"a": 0.5, "b": 0.5}, exact=False)
            assert c.records and all(set(r.arm_contrib) <= {"mix"} for r in c.records)
        finally:
            e.close()
