"""Reproducible seeds for the server: a request starts from KV-cache entries that a cold
prefill would compute bit for bit (`trim_for` in the backends, `Engine._trim_for`).

llama.cpp and onnxruntime round a one-token evaluation differently from a batched one (on
the Q4 base and the int8 ARMs of the default pack: up to ~0.6 nat), so positions decoded
one at a time, or a prompt whose last token alone is re-evaluated, would make the same
request give another text depending on what ran before it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_genarm.backends.llama_base import _chunks

PROMPT = [{"role": "user", "content": "Tell me about Mondays, then about Tuesdays."}]


def _models(engine):
    return {"base": engine.base, **engine.arms}


def test_chunks_never_leave_one_token_alone():
    assert _chunks(1, 512) == [(0, 1)]
    assert _chunks(513, 512) == [(0, 511), (511, 513)]
    assert _chunks(1024, 512) == [(0, 512), (512, 1024)]
    for n in range(2, 40):
        sizes = [j - i for i, j in _chunks(n, 8)]
        assert sum(sizes) == n and min(sizes) >= 2 and max(sizes) <= 8


@pytest.mark.parametrize("history", ["stepped", "same prompt", "longer batch"])
def test_trim_for_gives_the_cold_logits_bit_for_bit(engine, history):
    ids = engine.tokenize_prompt(engine.format_prompt(PROMPT))
    cold = {}
    for name, m in _models(engine).items():
        m.reset()
        cold[name] = np.array(m.prefill(ids), copy=True)
    for name, m in _models(engine).items():
        m.reset()
        if history == "stepped":  # the prompt's second half decoded one token at a time
            m.prefill(ids[:10])
            for t in ids[10:]:
                m.step(t)
        elif history == "same prompt":  # a reply after the same prompt: its last token re-evaluated alone
            m.prefill(ids)
            for t in (5, 6, 7):
                m.step(t)
        else:  # the prompt's prefix inside another, longer batch
            m.prefill(ids[:-3] + [11, 12, 13, 14, 15])
        m.trim_for(ids)
        got = np.array(m.prefill(ids), copy=True)
        np.testing.assert_array_equal(got, cold[name], err_msg=f"{name} after '{history}'")
    if history == "longer batch":  # the batched prefix is still reused
        assert engine.base.last_prefill_evaluated == 3


def test_same_seed_same_text_whatever_ran_before(engine):
    kw = dict(max_tokens=12, seed=4, temperature=1.0)
    engine.reset()
    want = engine.generate(PROMPT, **kw).tokens
    assert engine.generate(PROMPT, **kw).tokens == want  # right after itself
    engine.generate([{"role": "user", "content": "Something else."}], max_tokens=5, seed=1)
    assert engine.generate(PROMPT, **kw).tokens == want  # after another request
    turn2 = PROMPT + [{"role": "assistant", "content": "Mondays."}, {"role": "user", "content": "More."}]
    a = engine.generate(turn2, **kw).tokens  # turn 1 cached
    engine.reset()
    assert engine.generate(turn2, **kw).tokens == a  # cold


@pytest.mark.slow
def test_real_q4_base_same_seed_same_text_warm_or_cold(smollm2_gguf):
    """On the Q4_1 SmolLM2 base, re-evaluating a prompt's last token alone changed these replies
    (3 of 3 seeds) before requests started from exact cache entries."""
    from edge_genarm import load

    e = load(str(smollm2_gguf), n_ctx=1024)
    try:
        for seed in range(3):
            kw = dict(max_tokens=16, seed=seed, temperature=0.8)  # they differed from token 5 or 7
            e.reset()
            cold = e.generate("Tell me about Mondays.", **kw).text
            assert e.generate("Tell me about Mondays.", **kw).text == cold  # the same prompt cached
    finally:
        e.close()
