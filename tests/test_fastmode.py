"""Fast guidance (fastmode.py): ARMs skipped at confident steps, caught up without holes.

Checked against independent computations on the tiny bundle: at a guided step the sampled
distribution is base + ARMs computed by llama.cpp and PyTorch over the whole sequence (so the
ARM's cache, caught up in batches, holds every position), at a skipped step the base's alone.
"""

import numpy as np
import pytest

from edge_genarm import fastmode
from edge_genarm import guidance as G
from edge_genarm.errors import ConfigError

from .reference import ref_distribution, ref_log_softmax
from .test_engine import reference  # noqa: F401  (the fixture: llama.cpp + PyTorch on the same weights)

torch = pytest.importorskip("torch")

PARAMS = (0.9, 0, 1.0, 0.0)
W = {"alpha": 1.5, "beta": -0.4}


def _run(engine, exact, **kw):
    seen = []
    c = engine.generate("Tell me a story.", max_tokens=24, seed=4, weights=W, exact=exact,
                        sampling=G.SamplingParams(*PARAMS, dry_multiplier=0.0),
                        on_step=lambda i, s, p: seen.append(s.copy()), **kw)  # fmt: skip
    return c, seen


def test_fast_mode_samples_base_plus_arms_where_guided_and_the_base_elsewhere(engine, reference, monkeypatch):  # noqa: F811
    base_logits, arm_logits = reference
    exact, _ = _run(engine, True)
    tau = float(np.median([r.entropy for r in exact.records[1:]]))
    monkeypatch.setattr(fastmode, "FAST_TAU", tau)
    c, seen = _run(engine, False)
    guided = [r.guided for r in c.records]
    assert guided[0] and any(guided[1:]) and not all(guided[1:])  # both kinds of step happened
    assert c.timings.guided == sum(guided)
    assert c.timings.summary()["guided_fraction"] == pytest.approx(sum(guided) / len(guided))
    prompt = engine.tokenize_prompt(engine.format_prompt("Tell me a story."))
    seq = prompt + c.tokens
    b = base_logits(seq)
    arm = {k: arm_logits(k, seq) for k in W}
    for i, r in enumerate(c.records):
        pos = len(prompt) - 1 + i
        scores = ref_log_softmax(b[pos])
        assert (r.entropy < tau) == (not r.guided) or i == 0
        if r.guided:
            for k, w in W.items():
                scores = scores + w * ref_log_softmax(arm[k][pos])
            assert set(r.arm_contrib) == set(W)
        else:
            assert r.arm_contrib == {}
        got = G.sampling_distribution(seen[i], G.SamplingParams(*PARAMS))
        np.testing.assert_allclose(got, ref_distribution(scores, *PARAMS), rtol=2e-3, atol=1e-7,
                                   err_msg=f"step {i} guided={r.guided}")  # fmt: skip


def test_every_step_guided_is_the_exact_mode(engine, monkeypatch):
    monkeypatch.setattr(fastmode, "FAST_TAU", -1.0)
    exact, _ = _run(engine, True)
    fast, _ = _run(engine, False)
    assert fast.tokens == exact.tokens and fast.text == exact.text
    assert all(r.guided for r in fast.records) and fast.timings.guided == len(fast.records)


def test_without_a_mix_head_the_exact_mode_is_the_default_and_exact_must_be_a_boolean(engine):
    assert engine.mix is None
    a, _ = _run(engine, None)
    b, _ = _run(engine, True)
    assert a.tokens == b.tokens and fastmode.DEFAULT_EXACT and fastmode.default_exact(False)
    for bad in ("yes", 1, None.__class__):
        with pytest.raises(ConfigError, match="exact must be true or false"):
            engine.stream("Hi", weights=W, exact=bad)
    # no ARM active: nothing to skip, the request is unguided whatever `exact` says
    assert fastmode.gate_tau(False, guided=False) is None
    assert fastmode.gate_tau(False, guided=True) == fastmode.FAST_TAU


def test_exact_reaches_the_engine_from_the_cli_the_server_and_eval(engine, tiny_bundle, monkeypatch):
    from click.testing import CliRunner

    from edge_genarm.cli import main
    from edge_genarm.evaluate import parse_method
    from edge_genarm.server.params import ApiError, Spec, apply_genarm

    monkeypatch.setattr(fastmode, "FAST_TAU", 1e9)  # every step after the first skips the ARMs
    r = CliRunner().invoke(main, ["generate", "--weights", str(tiny_bundle), "--arm", "alpha=1", "--fast",
                                  "--explain", "-n", "6", "--seed", "1", "--temperature", "0", "Hi"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "[fast: 1 of " in r.output and "‹" in r.output
    r = CliRunner().invoke(main, ["generate", "--weights", str(tiny_bundle), "--arm", "alpha=1", "--exact",
                                  "--explain", "-n", "6", "--seed", "1", "--temperature", "0", "Hi"])  # fmt: skip
    assert r.exit_code == 0 and "[fast:" not in r.output
    spec = Spec("m", "Hi")
    apply_genarm(spec, {"genarm": {"exact": False}}, engine)
    assert spec.exact is False and spec.stream_kwargs()["exact"] is False
    with pytest.raises(ApiError) as e:
        apply_genarm(Spec("m", "Hi"), {"genarm": {"exact": "no"}}, engine)
    assert e.value.status == 400 and e.value.param == "genarm.exact" and "true or false" in e.value.message
    assert parse_method("alpha=1@exact=0", ["alpha", "beta"]).sampling == {"exact": False}
    with pytest.raises(ConfigError, match="exact=0|1"):
        parse_method("alpha=1@exact=2", ["alpha", "beta"])


@pytest.mark.parametrize("kind", [None, "int8", "int4"])
def test_lm_rows_compute_the_lm_head_graphs_logits_on_some_ids(tmp_path, kind):
    """backends.trunk.LMRows reads an LM-head graph's weight (float, or MatMulNBits at 4 or 8
    bits) and gives onnxruntime's logits on the asked ids: to float rounding for a float head, to
    the int8 rounding of the activations that ORT's kernel adds for a quantized one."""
    import onnx
    import onnxruntime as ort
    from edge_genarm.export.compact import lm_head_model
    from edge_genarm.export.share import _quantize_file

    from edge_genarm.backends.trunk import LMRows

    rng = np.random.default_rng(0)
    d, v = 96, 1000
    w = (rng.standard_normal((d, v)) * 0.05).astype(np.float32)
    path = tmp_path / "lmhead.onnx"
    onnx.save(lm_head_model(w), str(path))
    if kind:
        _quantize_file(path, kind, 32, 4)
        assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["MatMulNBits"]
    normed = rng.standard_normal((2, d)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"normed": normed[:, None]})[0][:, 0]
    ids = np.array([999, 0, 17, 500, 3, 42])
    got = LMRows(path).logits(normed, ids)
    assert got.shape == (2, len(ids))
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want[:, ids], atol=1e-5 * scale if kind is None else 2e-2 * scale)
    if kind:  # and the dequantized rows are the quantized weight, not the float one it came from
        assert np.abs(LMRows(path).rows(ids).T - w[:, ids]).max() > 1e-5
        # rows are kept once dequantized: asked again, among others, in another order, with a
        # repeat, they are the same; past ROWS_KEPT the table starts again, and is still right
        rows = LMRows(path)
        first = rows.rows(ids)
        more = np.array([42, 7, 999, 7, 3, 600])
        np.testing.assert_array_equal(rows.rows(more), LMRows(path).rows(more))
        np.testing.assert_array_equal(rows.rows(ids), first)
        assert rows._have.sum() == len(set(ids) | set(more))
        rows.ROWS_KEPT = 8
        np.testing.assert_array_equal(rows.rows(np.arange(20)), LMRows(path).rows(np.arange(20)))
        assert rows._n_kept > 8
        np.testing.assert_array_equal(rows.rows(ids), first)  # a new table: only these rows
        assert rows._have.sum() == len(ids)
