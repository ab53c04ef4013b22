"""The Generation: one at a time per engine, released however it ends; the forward-unit contract;
rollouts at the end of the context; prompts for a model without a chat template."""

import gc

import numpy as np
import pytest

from edge_genarm import guidance as G
from edge_genarm import load
from edge_genarm.backends.units import reusable
from edge_genarm.engine import Engine
from edge_genarm.errors import EdgeGenarmError
from edge_genarm.nudge import NudgeConfig

KW = dict(seed=1, sampling=G.SamplingParams(1.0, 0, 1.0, 0.0))


def test_the_cache_prefix_rule():
    assert reusable([1, 2, 3, 4], [1, 2, 3, 4, 5]) == 4  # evaluate only the new token
    assert reusable([1, 2, 3], [1, 2, 3]) == 2  # the same tokens: evaluate the last one again
    assert reusable([1, 2, 9], [1, 2, 3, 4]) == 2  # up to the first difference
    assert reusable([], [7]) == 0
    # exact (seeded) rule: only batch-computed positions, >= 2 left to evaluate in one batch
    assert reusable([1, 2, 3, 4], [1, 2, 3, 4, 5, 6], n_exact=3) == 3
    assert reusable([1, 2, 3, 4], [1, 2, 3, 4, 5, 6], n_exact=9) == 4
    assert reusable([1, 2, 3, 4], [1, 2, 3, 4, 5], n_exact=9) == 3


def test_a_second_generation_is_refused_while_the_first_runs(engine):
    a = engine.stream("Hello", max_tokens=4, **KW)
    b = engine.stream("Hello", max_tokens=4, **KW)
    first = next(a)
    with pytest.raises(EdgeGenarmError, match="finish or close the first generation"):
        next(b)
    rest = list(a)  # the first is unharmed by the refusal
    assert len([first, *rest]) == 4 and a.finish_reason == "length"
    assert [r.token for r in [first, *rest]] == engine.generate("Hello", max_tokens=4, **KW).tokens


def test_generations_one_after_the_other_give_what_each_gives_alone(engine):
    want_a = engine.generate("Hello", max_tokens=5, **KW).tokens
    want_b = engine.generate("Write a poem.", max_tokens=3, **KW).tokens
    a = engine.stream("Hello", max_tokens=5, **KW)
    b = engine.stream("Write a poem.", max_tokens=3, **KW)
    assert [r.token for r in a] == want_a
    assert [r.token for r in b] == want_b


@pytest.mark.parametrize("how", ["close", "drop", "break-and-close"])
def test_a_generation_stopped_early_lets_the_engine_go(engine, how):
    a = engine.stream("Hello", max_tokens=8, **KW)
    if how == "break-and-close":
        for _ in a:
            break
    else:
        next(a)
    if how == "drop":
        del a
        gc.disable()  # no collector run: dropping it must be enough
    else:
        a.close()
        assert list(a) == []  # closed: nothing more
    try:
        c = engine.generate("Hello", max_tokens=3, **KW)
    finally:
        gc.enable()
    assert len(c.tokens) == 3


def test_a_generation_closed_before_it_started_never_holds_the_engine(engine):
    a = engine.stream("Hello", max_tokens=3, **KW)
    a.close()
    assert list(a) == [] and a.finish_reason is None
    assert len(engine.generate("Hello", max_tokens=2, **KW).tokens) == 2


def test_a_failed_generation_lets_the_engine_go(engine):
    def boom(i, scores, params):
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        engine.generate("Hello", max_tokens=3, on_step=boom, **KW)
    assert len(engine.generate("Hello", max_tokens=2, **KW).tokens) == 2


class _ConstantArm:
    """A forward unit the engine has never seen: fixed logits for one ARM name."""

    after_base = False

    def __init__(self, name, logits):
        self.name, self.names, self.unit, self.logits = name, (name,), self, logits
        self.calls = []

    def prefill(self, tokens, names=None):
        self.calls.append(("prefill", len(tokens)))
        return {self.name: self.logits}

    def step(self, token, names=None):
        self.calls.append(("step", token))
        return {self.name: self.logits}

    def trim_for(self, tokens, names=None):
        pass

    def reset(self):
        self.calls.clear()

    @property
    def graphs(self):
        return []


@pytest.mark.parametrize("parallel", [False, True])
def test_any_unit_that_keeps_the_contract_guides(engine, parallel):
    v = engine.base.n_vocab
    logits = np.full(v, -30.0, dtype=np.float32)
    logits[[65, 66]] = 0.0  # the ARM allows only two tokens
    arm = _ConstantArm("const", logits)
    e = Engine(engine.base, {"const": arm}, {"const": 1.0}, parallel=parallel)
    try:
        c = e.generate("Hello", max_tokens=4, **KW)
    finally:
        e.close()
    assert set(c.tokens) <= {65, 66}
    assert arm.calls[0][0] == "prefill" and [k for k, _ in arm.calls[1:]] == ["step"] * 3
    for r in c.records:
        assert r.arm_contrib["const"] == pytest.approx(-np.log(2.0), abs=1e-5)
    assert list(c.timings.arm_s) == ["const"]


def test_rollouts_at_the_end_of_the_context_stop_at_the_budget(tiny_bundle):
    e = load(str(tiny_bundle), ["alpha=1.0"], n_ctx=40)
    try:
        ids = e.prompt_ids("Hi")
        cfg = NudgeConfig(tau=0.0, min_gap=1, top_k=4, rollouts=3, rollout_len=4)
        c = e.generate("Hi", max_tokens=None, nudge=cfg, ignore_eos=True, **KW)
    finally:
        e.close()
    assert c.finish_reason == "length" and len(ids) + len(c.tokens) == 40
    assert c.nudge.sites == list(range(len(c.tokens)))  # every step a verified site, the last ones too
    assert [s for s, _ in c.nudge.rollouts] == c.nudge.sites


def test_no_template_sends_strings_raw_and_messages_as_a_transcript(engine):
    saved = engine.chat_template
    try:
        assert engine.prompt_format == "template"
        engine.chat_template = None
        assert engine.prompt_format == "raw"
        assert engine.format_prompt("Once upon a time") == "Once upon a time"
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Tell me more."}]  # fmt: skip
        assert engine.format_prompt(msgs, system="Be brief.") == (
            "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Tell me more.\nAssistant:"
        )
        assert engine.format_prompt("Hi", system="Be brief.") == "System: Be brief.\nUser: Hi\nAssistant:"
        assert "<|im_start|>" not in engine.format_prompt(msgs)  # no ChatML assumed
        # one user message alone is its text, as the string is, and as training renders it
        assert engine.format_prompt([{"role": "user", "content": "Once upon a time"}]) == "Once upon a time"
        from edge_genarm.export.sources import RAW_TEMPLATE
        from jinja2 import Template

        for m in (msgs, msgs[:1], [{"role": "system", "content": "Be brief."}, *msgs]):
            assert Template(RAW_TEMPLATE).render(messages=m) == engine.format_prompt(m)
    finally:
        engine.chat_template = saved
