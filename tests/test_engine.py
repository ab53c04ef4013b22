"""The decoding loop against independent computations on the tiny bundle.

The base through a second, independent llama.cpp context (logits_all, the
library's own eval); each ARM through PyTorch on the Hugging Face weights it was
exported from; the combination and truncation in float64 with full sorts.
"""

import numpy as np
import pytest

from edge_genarm import guidance as G

from .reference import ref_distribution, ref_log_softmax

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference(tiny_root):
    import llama_cpp
    from transformers import AutoModelForCausalLM

    llm = llama_cpp.Llama(str(tiny_root / "bundle" / "base.gguf"), n_ctx=512, logits_all=True, verbose=False)
    arms = {n: AutoModelForCausalLM.from_pretrained(tiny_root / "hf" / n).eval() for n in ("alpha", "beta")}

    def base_logits(tokens):
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)

    def arm_logits(name, tokens):
        with torch.no_grad():
            return arms[name](torch.tensor([tokens])).logits[0].double().numpy()

    return base_logits, arm_logits


def run_and_capture(engine, prompt, **kw):
    seen = []
    c = engine.generate(prompt, on_step=lambda i, s, p: seen.append((s.copy(), p)), **kw)
    return c, seen


@pytest.mark.parametrize("weights", [{}, {"alpha": 1.5}, {"alpha": 0.7, "beta": -0.4}])
@pytest.mark.parametrize("params", [(0.9, 0, 1.0, 0.0), (0.8, 20, 0.9, 0.02)])
def test_sampled_distribution_equals_independent_computation(engine, reference, weights, params):
    base_logits, arm_logits = reference
    all_w = {"alpha": 0.0, "beta": 0.0, **weights}
    c, seen = run_and_capture(
        engine, "Tell me a story.", max_tokens=12, seed=3, weights=all_w, sampling=G.SamplingParams(*params)
    )
    prompt_ids = engine.tokenize_prompt(engine.format_prompt("Tell me a story."))
    seq = prompt_ids + c.tokens
    n = len(seen)
    assert n >= 1
    b = base_logits(seq)
    arm = {k: arm_logits(k, seq) for k, w in weights.items()}
    for i in range(n):
        pos = len(prompt_ids) - 1 + i
        scores = ref_log_softmax(b[pos])
        for k, w in weights.items():
            scores = scores + w * ref_log_softmax(arm[k][pos])
        expected = ref_distribution(scores, *params)
        got = G.sampling_distribution(seen[i][0], seen[i][1])
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-7, err_msg=f"step {i}")


def test_unguided_sampling_equals_plain_sampling_from_the_base(engine, reference):
    base_logits, _ = reference
    seed = 11
    c = engine.generate(
        "Hi!", max_tokens=16, seed=seed, guidance=False, sampling=G.SamplingParams(1.0, 0, 1.0, 0.0)
    )
    prompt_ids = engine.tokenize_prompt(engine.format_prompt("Hi!"))
    rng = np.random.default_rng(seed)
    seq = list(prompt_ids)
    for tok in c.tokens:
        p = np.exp(ref_log_softmax(base_logits(seq)[-1]))
        want = int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"))
        assert tok == want
        seq.append(tok)


def test_same_seed_same_text_other_seed_other_text(engine):
    kw = dict(max_tokens=24, sampling=G.SamplingParams(1.0, 0, 1.0, 0.0))
    a = engine.generate("Write a poem.", seed=5, **kw)
    b = engine.generate("Write a poem.", seed=5, **kw)
    c = engine.generate("Write a poem.", seed=6, **kw)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_records_carry_the_per_token_breakdown(engine):
    engine.set_weights({"alpha": 1.0, "beta": 0.5})
    c = engine.generate("Hello", max_tokens=5, seed=1, sampling=G.SamplingParams(1.0, 0, 1.0, 0.0))
    r = c.records[0]
    assert set(r.arm_contrib) == {"alpha", "beta"}
    assert r.base_logprob < 0 and r.entropy > 0
    assert "".join(x.text for x in c.records) == c.text
    engine.set_weights({"alpha": 0.0, "beta": 0.0})


def test_kv_cache_prefix_reuse_matches_a_fresh_evaluation(engine, reference):
    base_logits, arm_logits = reference
    a = engine.tokenize_prompt(engine.format_prompt("first turn"))
    b = a[:-2] + [300, 301, 302]
    engine.base.prefill(a)
    engine.arms["alpha"].prefill(a)
    got_b = engine.base.prefill(b).copy()
    got_a = engine.arms["alpha"].prefill(b)
    assert engine.base.tokens == b
    np.testing.assert_allclose(got_b, base_logits(b)[-1], atol=1e-4)
    np.testing.assert_allclose(got_a, arm_logits("alpha", b)[-1], atol=1e-4)


def test_stop_strings_and_max_tokens(engine):
    c = engine.generate("Hello", max_tokens=40, seed=2, sampling=G.SamplingParams(1.0, 0, 1.0, 0.0))
    assert c.finish_reason == "length" and len(c.tokens) == 40
    word = c.text[len(c.text) // 3 : len(c.text) // 3 + 3]
    d = engine.generate(
        "Hello", max_tokens=40, seed=2, stop=[word], sampling=G.SamplingParams(1.0, 0, 1.0, 0.0)
    )
    assert d.finish_reason == "stop"
    assert d.text == c.text[: c.text.index(word)]


def test_request_state_lives_in_the_request(engine):
    """weights= applies to one request; results come back on the request, not the engine."""
    engine.set_weights({"alpha": 0.0, "beta": 0.0})
    kw = dict(seed=1, sampling=G.SamplingParams(1.0, 0, 1.0, 0.0))
    a = engine.stream("Hello", max_tokens=3, weights={"alpha": 1.5}, **kw)
    b = engine.stream("Hello", max_tokens=5, **kw)
    ra, rb = list(a), list(b)
    assert engine.weights == {"alpha": 0.0, "beta": 0.0}  # the defaults did not move
    assert a.weights == {"alpha": 1.5, "beta": 0.0} and b.weights == {"alpha": 0.0, "beta": 0.0}
    assert set(ra[0].arm_contrib) == {"alpha"} and rb[0].arm_contrib == {}
    assert a.timings.steps == 3 and b.timings.steps == 5
    assert a.finish_reason == b.finish_reason == "length"
    c = engine.generate("Hello", max_tokens=3, weights={"alpha": 1.5}, **kw)
    assert c.weights["alpha"] == 1.5 and c.tokens == [r.token for r in ra]


def test_repeat_penalty_leaves_the_base_logprobs_alone(engine, reference):
    base_logits, _ = reference
    c = engine.generate("Hello", max_tokens=8, seed=2, guidance=False, repeat_penalty=1.5, repeat_last_n=64,
                        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # fmt: skip
    seq = engine.tokenize_prompt(engine.format_prompt("Hello"))
    for r in c.records:
        want = ref_log_softmax(base_logits(seq)[-1])[r.token]
        assert r.base_logprob == pytest.approx(want, abs=2e-3)  # unpenalised
        seq.append(r.token)
