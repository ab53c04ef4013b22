"""The guidance math against direct, independent computations on small arrays."""

import math

import numpy as np
import pytest

from edge_genarm import guidance as G
from edge_genarm.errors import ConfigError
from edge_genarm.nudge import NudgeConfig

from .reference import ref_distribution, ref_log_softmax


def test_log_softmax_and_entropy_match_direct():
    x = np.array([1.0, 2.0, 3.0, -1.0], dtype=np.float32)
    lp, h = G.log_softmax_entropy(x)
    ref = ref_log_softmax(x)
    np.testing.assert_allclose(lp, ref, atol=1e-6)
    p = np.exp(ref)
    assert h == pytest.approx(-(p * np.log(p)).sum(), abs=1e-6)
    assert G.entropy(np.zeros(8)) == pytest.approx(math.log(8), abs=1e-6)
    assert G.entropy(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(0.0, abs=1e-7)


def test_log_softmax_does_not_mutate_input():
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    G.log_softmax(x)
    assert x.tolist() == [1.0, 2.0, 3.0]


def test_combine_is_the_plain_weighted_sum():
    base = ref_log_softmax([0.0, 1.0, 2.0, 3.0]).astype(np.float32)
    a1 = ref_log_softmax([3.0, 2.0, 1.0, 0.0]).astype(np.float32)
    a2 = ref_log_softmax([0.0, 0.0, 5.0, 0.0]).astype(np.float32)
    s = G.combine(base, [a1, a2], [0.5, 2.0])
    np.testing.assert_allclose(s, base + 0.5 * a1 + 2.0 * a2, atol=1e-6)
    # temperature 1, no truncation: exactly p_base * p_a1^0.5 * p_a2^2, renormalised
    p = G.sampling_distribution(s, G.SamplingParams(1.0, 0, 1.0, 0.0))
    target = np.exp(base) * np.exp(a1) ** 0.5 * np.exp(a2) ** 2
    np.testing.assert_allclose(p, target / target.sum(), atol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        G.combine(base, [a1], [1.0, 2.0])


@pytest.mark.parametrize(
    "params",
    [
        (1.0, 0, 1.0, 0.0),
        (0.7, 2, 1.0, 0.0),
        (1.0, 0, 0.6, 0.0),
        (1.0, 0, 1.0, 0.3),
        (1.3, 3, 0.8, 0.1),
        (0.0, 0, 1.0, 0.0),
        (0.5, 1, 1.0, 0.0),
    ],
)
def test_truncation_on_four_tokens(params):
    s = np.array([0.1, 2.0, 1.5, -1.0], dtype=np.float32)
    p = G.sampling_distribution(s, G.SamplingParams(*params))
    np.testing.assert_allclose(p, ref_distribution(s, *params), atol=1e-6)


def test_top_p_exact_values():
    # p = [0.5, 0.3, 0.2]: top_p 0.6 keeps two tokens, renormalised to 5/8, 3/8
    s = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    p = G.sampling_distribution(s, G.SamplingParams(1.0, 0, 0.6, 0.0))
    np.testing.assert_allclose(p, [0.625, 0.375, 0.0], atol=1e-6)
    p = G.sampling_distribution(s, G.SamplingParams(1.0, 0, 1.0, 0.5))  # min_p: >= 0.25
    np.testing.assert_allclose(p, [0.625, 0.375, 0.0], atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_fast_paths_equal_full_sort_on_large_vocab(seed):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal(49152) * rng.uniform(0.5, 6)).astype(np.float32)
    for params in [
        (0.8, 40, 0.95, 0.05),
        (1.0, 0, 0.9, 0.0),
        (1.0, 0, 1.0, 0.05),
        (0.6, 1000, 0.99, 0.0),
        (1.0, 5, 1.0, 0.0),
        (2.0, 0, 0.5, 0.0),
    ]:
        p = G.sampling_distribution(s, G.SamplingParams(*params))
        np.testing.assert_allclose(p, ref_distribution(s, *params), atol=1e-6, err_msg=str(params))


def test_sample_frequencies_follow_the_distribution():
    s = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    params = G.SamplingParams(1.0, 0, 1.0, 0.0)
    rng = np.random.default_rng(0)
    counts = np.bincount([G.sample(s, params, rng) for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / 20000, [0.1, 0.2, 0.3, 0.4], atol=0.015)


def test_sample_is_inverse_cdf_with_one_uniform():
    s = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    params = G.SamplingParams(1.0, 0, 1.0, 0.0)
    a, b = np.random.default_rng(42), np.random.default_rng(42)
    for _ in range(100):
        tok = G.sample(s, params, a)
        u = b.random()
        assert tok == int(np.searchsorted(np.cumsum([0.1, 0.2, 0.3, 0.4]), u, side="right"))


def test_greedy_and_masked_scores():
    s = np.array([0.0, -np.inf, 3.0, 1.0], dtype=np.float32)
    assert G.sample(s, G.SamplingParams(0.0), np.random.default_rng()) == 2
    p = G.sampling_distribution(s, G.SamplingParams(1.0, 0, 1.0, 0.0))
    assert p[1] == 0.0


def test_is_finite():
    assert G.is_finite(np.array([0.0, -np.inf]))
    assert not G.is_finite(np.array([0.0, np.nan]))
    assert not G.is_finite(np.array([0.0, np.inf]))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
        (dict(repeat_last_n=-1), "repeat_last_n"),
    ],
)
def test_bad_sampling_params_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        G.SamplingParams(**kw)


def test_repeat_penalty_is_llama_cpp_rule():
    scores = np.array([2.0, -1.0, -3.0, 0.5, -0.2], dtype=np.float32)
    out = G.repeat_penalty(scores.copy(), [0, 1, 1, 9], 1.25)  # 9: past the vocabulary, ignored
    expected = [2.0 / 1.25, -1.0 * 1.25, -3.0, 0.5, -0.2]  # each seen id once: divide if > 0, else multiply
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert G.repeat_penalty(scores.copy(), [0, 1], 1.0).tolist() == scores.tolist()


def test_repeat_penalty_in_the_loop(engine):
    """A huge penalty: greedy decoding never repeats a token within the window."""
    c = engine.generate("Count: one one one one one", max_tokens=24, guidance=False,
                        sampling=G.SamplingParams(0.0, 0, 1.0, 0.0, repeat_penalty=1e4, repeat_last_n=64))  # fmt: skip
    ids = engine.tokenize_prompt(engine.format_prompt("Count: one one one one one"))
    seq = ids + c.tokens
    for i, t in enumerate(c.tokens):
        assert t not in seq[len(ids) + i - 64 : len(ids) + i]


def _dry_brute(seq, vocab, mult, base, allowed, breakers):
    """DRY from its definition: token c loses mult * base**(L - allowed) where L is the longest
    breaker-free suffix of `seq` that occurs earlier followed by c."""
    out = np.zeros(vocab, dtype=np.float64)
    n = len(seq)
    for c in range(vocab):
        best = 0
        for L in range(1, n):
            suffix = seq[n - L :]
            if any(t in breakers for t in suffix):
                break
            hit = any(seq[j - L + 1 : j + 1] == suffix and seq[j + 1] == c for j in range(L - 1, n - 1))
            if hit:
                best = L
        if best >= allowed:
            out[c] = mult * base ** (best - allowed)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_dry_penalty_matches_its_definition(seed):
    rng = np.random.default_rng(seed)
    vocab = 6
    # short alphabets make long repeats likely; breakers are ids 5 (sometimes absent)
    seq = rng.integers(0, 3 if seed % 2 else 6, size=int(rng.integers(2, 40))).tolist()
    breakers = frozenset({5}) if seed % 3 else frozenset()
    params = G.SamplingParams(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_last_n=0)
    scores = rng.normal(size=vocab).astype(np.float32)
    got = scores - G.dry_penalty(scores.copy(), seq, params, breakers)
    want = _dry_brute(seq, vocab, 0.8, 1.75, 2, breakers)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dry_on_a_loop_and_off_by_default():
    seq = [1, 2, 3, 4, 1, 2, 3]  # "1 2 3" again: 4 would extend a 3-token repeat
    on = G.SamplingParams(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2)
    s = G.dry_penalty(np.zeros(8, dtype=np.float32), seq, on)
    assert s[4] == pytest.approx(-2.0) and np.count_nonzero(s) == 1  # 1.0 * 2 ** (3 - 2)
    assert not np.any(G.dry_penalty(np.zeros(8, dtype=np.float32), seq, G.SamplingParams()))
    assert not np.any(G.dry_penalty(np.zeros(8, dtype=np.float32), seq, on, breakers=frozenset({3})))
    with pytest.raises(ConfigError, match="dry_multiplier"):
        G.SamplingParams(dry_multiplier=float("nan"))


def test_dry_in_the_loop_is_auto_on_for_guided_requests(engine):
    """At the first step the sampler's scores lose exactly the DRY penalty of the prompt's
    history; "auto" (None) is GUIDED_DRY * (1 + sum |w|) with an ARM active, off without one."""
    arm = next(iter(engine.arms))
    prompt = "Count: one two one two one two one two"
    first: dict = {}

    def run(dry, w):
        def hook(i, scores, p):
            first.setdefault((dry, w), (scores.copy(), p.dry_multiplier))

        weights = {a: 0.0 for a in engine.arms} | {arm: w}
        engine.generate(prompt, max_tokens=2, seed=3, weights=weights, dry_multiplier=dry, on_step=hook,
                        raw=True)  # fmt: skip (raw: the history ends in the repeats, not a template newline)
        return first[(dry, w)]

    (plain, _), (penalised, mult) = run(0.0, 1.0), run(4.0, 1.0)
    seq = engine.tokenize_prompt(engine.format_prompt(prompt, raw=True))
    want = G.dry_penalty(plain.copy(), seq, G.SamplingParams(dry_multiplier=4.0), engine.dry_breakers)
    assert mult == 4.0 and not np.array_equal(want, plain)  # the history repeats: something is penalised
    np.testing.assert_allclose(penalised, want, rtol=1e-6, atol=1e-6)
    assert run(None, 1.0)[1] == pytest.approx(2 * G.GUIDED_DRY) and run(None, 0.0)[1] == 0.0
    assert run(None, 0.5)[1] == pytest.approx(1.5 * G.GUIDED_DRY)  # in the units of the combined scores
    assert run(None, -0.5)[1] == pytest.approx(1.5 * G.GUIDED_DRY)  # steering away sharpens them too
    nudged = []
    engine.generate(prompt, max_tokens=1, seed=3, weights={a: 0.0 for a in engine.arms}, raw=True,
                    nudge=NudgeConfig(), on_step=lambda i, s, p: nudged.append(p.dry_multiplier))  # fmt: skip
    assert nudged == [G.GUIDED_DRY]  # nudging steers too: DRY is on (no ARM weight: unscaled)
