"""Entropy-triggered nudging: the rule, the table, the modes, the loop, the export."""

import json
import math
import shutil

import numpy as np
import pytest

from edge_genarm import guidance as G
from edge_genarm import load
from edge_genarm.errors import BundleError, ConfigError
from edge_genarm.gguf import vocab_fingerprint
from edge_genarm.nudge import (
    NudgeConfig,
    NudgeTable,
    apply_site,
    candidate_scores,
    choose_tau,
    is_site,
)

from .reference import ref_distribution, ref_log_softmax


@pytest.mark.parametrize("seed", range(3))
def test_entropy_on_synthetic_distributions(seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(50, 0.3))
    h = G.entropy(np.log(p).astype(np.float32))
    assert h == pytest.approx(-(p * np.log(p)).sum(), abs=1e-4)
    assert G.entropy(np.array([5.0, -50.0, -50.0], dtype=np.float32)) < 1e-15 + 1e-6
    assert G.entropy(np.zeros(1000, dtype=np.float32)) == pytest.approx(math.log(1000), abs=1e-5)


def test_trigger_rule_threshold_gap_and_first_site():
    cfg = NudgeConfig(tau=1.0, min_gap=3)
    assert is_site(0, 0.0, None, cfg)  # the first content token, whatever its entropy
    assert not is_site(1, 0.5, 0, cfg)  # below tau
    assert not is_site(2, 5.0, 0, cfg)  # above tau but only 2 tokens since the site
    assert is_site(3, 1.0, 0, cfg)  # tau is inclusive, gap reached
    hs = [0.1, 2, 2, 2, 2, 0.1, 2, 2]
    last, sites = None, []
    for i, h in enumerate(hs):
        if is_site(i, h, last, cfg):
            sites.append(i)
            last = i
    assert sites == [0, 3, 6]


def test_choose_tau_hits_the_target_rate():
    rng = np.random.default_rng(0)
    seqs = [list(rng.exponential(1.0, size=200)) for _ in range(10)]
    tau = choose_tau(seqs, 0.1, min_gap=3)
    fired = 0
    for s in seqs:
        last = None
        for i, h in enumerate(s):
            if is_site(i, h, last, NudgeConfig(tau=tau)):
                fired, last = fired + 1, i
    assert abs(fired / 2000 - 0.1) < 0.01
    with pytest.raises(ConfigError, match="target trigger rate"):
        choose_tau(seqs, 1.5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tau=-0.5), "tau must be >= 0"),
        (dict(tau="high"), "tau must be a number"),
        (dict(tau=float("nan")), "tau must be a number"),
        (dict(top_k=0), "top-K"),
        (dict(mode="shove"), "mode"),
        (dict(min_gap=0), "gap"),
        (dict(rollouts=-1), "rollouts must be an integer >= 0"),
        (dict(rollout_len=0), "rollout_len must be an integer >= 1"),
    ],
)
def test_bad_nudge_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        NudgeConfig(**kw)


def test_k_larger_than_vocab():
    lp = np.log(np.full(10, 0.1, dtype=np.float32))
    with pytest.raises(ConfigError, match="top-K 25 is larger than the vocabulary \\(10\\)"):
        candidate_scores(lp, lp, 25, None, 1.0)


def test_force_mode_picks_the_best_mixed_score():
    base = ref_log_softmax([3.0, 2.9, 2.8, -5.0, 1.0]).astype(np.float32)
    arm_part = np.array([0.0, 0.5, 0.0, 0.0, 0.0], dtype=np.float32)  # ARM likes token 1
    scores = base + arm_part
    nudge = np.array([0.0, 0.0, 10.0, 0.0, 0.0], dtype=np.float32)  # reward direction likes token 2
    cfg = NudgeConfig(top_k=3, strength=0.0)
    assert apply_site(base, scores, cfg, nudge).forced == 1  # no nudge: the ARM decides
    cfg = NudgeConfig(top_k=3, strength=5.0)
    assert apply_site(base, scores, cfg, nudge).forced == 2
    cfg = NudgeConfig(top_k=2, strength=5.0)  # token 2 is not among the base top-2
    assert apply_site(base, scores, cfg, nudge).forced == 1


def test_bias_mode_adds_the_standardised_score_to_the_candidates_only():
    base = ref_log_softmax([2.0, 1.0, 0.5, 0.0]).astype(np.float32)
    nudge = np.array([1.0, 3.0, 2.0, 100.0], dtype=np.float32)
    cfg = NudgeConfig(top_k=3, mode="bias", strength=0.5)
    site = apply_site(base, base, cfg, nudge)
    forced, biased = site.forced, site.biased
    assert forced is None
    raw = np.array([1.0, 3.0, 2.0])
    z = (raw - raw.mean()) / raw.std()
    want = base.astype(np.float64).copy()
    want[:3] += 0.5 * z
    np.testing.assert_allclose(biased, want, atol=1e-6)
    p = G.sampling_distribution(biased, G.SamplingParams(1.0, 0, 1.0, 0.0))
    np.testing.assert_allclose(p, ref_distribution(want, 1.0, 0, 1.0, 0.0), atol=1e-6)


def _table(tokens, rng, clusters=0):
    v = len(tokens)
    meta = {"n_vocab": v, "vocab_fingerprint": vocab_fingerprint(tokens)}
    if not clusters:
        return NudgeTable(rng.standard_normal((1, v)).astype(np.float32), meta=meta)
    return NudgeTable(
        rng.standard_normal((1 + clusters, v)).astype(np.float32),
        rng.standard_normal((v, 4)).astype(np.float32),
        rng.standard_normal((clusters, 4)).astype(np.float32),
        meta,
    )


def test_nudge_file_round_trip_and_fingerprint(tmp_path):
    tokens = [f"t{i}" for i in range(100)]
    t = _table(tokens, np.random.default_rng(0), clusters=2)
    t.save(tmp_path / "n.npz")
    u = NudgeTable.load(tmp_path / "n.npz", tokens)
    np.testing.assert_allclose(u.scores, t.scores.astype(np.float16).astype(np.float32))
    ctx = [3, 4, 5]
    f = u.ctx_proj[ctx].mean(0)
    want = 1 + int(np.argmin(((u.centroids - f) ** 2).sum(1)))
    np.testing.assert_array_equal(u.direction_for(ctx), u.scores[want])
    other = tokens[:50] + ["x"] + tokens[51:]
    with pytest.raises(BundleError, match="another tokenizer or model"):
        NudgeTable.load(tmp_path / "n.npz", other)
    with pytest.raises(BundleError, match="another tokenizer or model"):
        NudgeTable.load(tmp_path / "n.npz", tokens + ["extra"])
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="unreadable"):
        NudgeTable.load(tmp_path / "bad.npz")


def test_loop_nudges_exactly_at_the_sites(engine):
    table = _table(engine.base.info.tokens, np.random.default_rng(1))
    engine.nudge_table = table
    cfg = NudgeConfig(tau=9.0, min_gap=3, top_k=5, strength=3.0)
    picks = []

    def spy(i, scores, params):
        picks.append(scores.copy())

    try:
        c = engine.generate(
            "Tell me about rain.",
            max_tokens=24,
            seed=3,
            nudge=cfg,
            guidance=False,
            sampling=G.SamplingParams(1.0, 0, 1.0, 0.0),
            on_step=spy,
        )
    finally:
        engine.nudge_table = None
    rep = c.nudge
    assert rep.sites[0] == 0 and all(b - a >= 3 for a, b in zip(rep.sites, rep.sites[1:]))
    assert all(c.records[i].entropy >= 9.0 for i in rep.sites[1:])
    assert [i for i, r in enumerate(c.records) if r.site] == rep.sites
    for i in rep.sites:  # the forced token: best of the base top-5 by log p_base + strength * z
        lp = ref_log_softmax(picks[i])
        top = np.argsort(-lp)[:5]
        raw = table.scores[0][top].astype(np.float64)
        z = (raw - raw.mean()) / raw.std()
        assert c.records[i].token == top[np.argmax(lp[top] + 3.0 * z)]
    assert len(rep.changes) == sum(r.nudged_from is not None for r in c.records)
    assert rep.summary()["trigger_rate"] == len(rep.sites) / rep.steps


def _fresh_lp(model, toks):
    """log-softmax at the last position from a cold start: no KV cache reused."""
    model.reset()
    return ref_log_softmax(np.asarray(model.prefill(list(toks)), dtype=np.float64))


def _ref_rollout(engine, prefix, cand, horizon, w):
    arm = engine.arms["alpha"]
    toks, score, tok = prefix + [cand], w * _fresh_lp(arm, prefix)[cand], cand
    for _ in range(horizon - 1):
        if tok in engine.base.eos_ids:
            break
        a = _fresh_lp(arm, toks)
        tok = int(np.argmax(_fresh_lp(engine.base, toks) + w * a))
        score, toks = score + w * a[tok], toks + [tok]
    return score


def test_rollouts_keep_the_best_arm_sum_and_restore_the_caches(engine):
    before = dict(engine.weights)
    cfg = NudgeConfig(tau=9.0, min_gap=3, top_k=5, rollouts=3, rollout_len=3)
    prompt = "Tell me about rain."
    try:
        c = engine.generate(prompt, max_tokens=10, seed=3, nudge=cfg, weights={"alpha": 0.7, "beta": 0.0},
                            sampling=G.SamplingParams(1.0, 0, 1.0, 0.0))  # fmt: skip
        ids = engine.tokenize_prompt(engine.format_prompt(prompt))
        toks = [r.token for r in c.records]
        rep = c.nudge
        assert [step for step, _ in rep.rollouts] == rep.sites and rep.rollout_tokens > 0
        for step, results in rep.rollouts:
            assert len(results) == 3 and toks[step] == max(results, key=lambda r: r[1])[0]
            for cand, score in results:  # each rollout score, recomputed from cold starts
                assert score == pytest.approx(_ref_rollout(engine, ids + toks[:step], cand, 3, 0.7), abs=2e-3)
        for i, r in enumerate(c.records):  # the caches were put back: every step saw the real sequence
            assert r.base_logprob == pytest.approx(_fresh_lp(engine.base, ids + toks[:i])[r.token], abs=2e-3)
            a = _fresh_lp(engine.arms["alpha"], ids + toks[:i])[r.token]
            assert r.arm_contrib["alpha"] == pytest.approx(0.7 * a, abs=2e-3)
        with pytest.raises(ConfigError, match="rollouts are scored by the ARMs"):
            engine.generate(prompt, max_tokens=2, nudge=cfg, guidance=False)
    finally:
        engine.set_weights(before)


def test_nudging_needs_a_table_or_arms(tiny_bundle):
    e = load(str(tiny_bundle), [])
    with pytest.raises(ConfigError, match="nudge table .* or ARMs"):
        e.generate("Hi", nudge=NudgeConfig())


def test_export_nudges_on_a_tiny_reward_model(tiny_root, tmp_path):
    pytest.importorskip("torch")
    from edge_genarm.export.nudges import export_nudges

    b = tmp_path / "b"
    shutil.copytree(tiny_root / "bundle", b)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Hi there", "Tell me a joke", "Rain?"]))
    meta = export_nudges(
        b, tiny_root / "hf" / "alpha", prompts, n_prompts=3, max_tokens=8, clusters=2, rank=8
    )
    assert meta["reward_kind"] == "arm" and meta["n_sites"] > 0 and meta["clusters"] == 2
    e = load(str(b), ["alpha=1.0"])
    assert e.nudge_table is not None and e.nudge_table.scores.shape == (3, 49152)
    c = e.generate("Hello", max_tokens=6, seed=0, nudge=NudgeConfig(tau=0.0))
    assert c.nudge.sites == [0, 3]
    m = json.loads((b / "manifest.json").read_text())
    assert "nudges.npz" in m["files"] and m["nudges"]["reward_kind"] == "arm"
