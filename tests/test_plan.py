"""Loading reads forward: bundle -> LoadPlan (checked, picklable) -> engine built from it."""

import json
import pickle

import pytest

from edge_genarm import load
from edge_genarm.bundle import Bundle
from edge_genarm.errors import ConfigError, TokenizerMismatchError
from edge_genarm.loader import build_engine
from edge_genarm.plan import make_plan


def test_a_plan_pickles_and_builds_the_engine_load_builds(tiny_bundle):
    plan = make_plan(Bundle.open(tiny_bundle), ["alpha=0.5", "beta"])
    assert plan.weights == {"alpha": 0.5, "beta": 1.0} and plan.n_tokens == {"alpha": 49152, "beta": 49152}
    assert plan.n_base_tokens == 49152 and plan.n_units == 2 and plan.nudges is None
    copy = pickle.loads(pickle.dumps(plan))  # what a Ray actor receives
    assert copy == plan
    e1, e2 = build_engine(copy, n_ctx=256), load(str(tiny_bundle), ["alpha=0.5", "beta"], n_ctx=256)
    try:
        a = e1.generate("Hello", max_tokens=8, seed=3)
        b = e2.generate("Hello", max_tokens=8, seed=3)
        assert a.tokens == b.tokens and a.weights == b.weights == {"alpha": 0.5, "beta": 1.0}
        assert [r.arm_contrib for r in a.records] == [r.arm_contrib for r in b.records]
    finally:
        e1.close()
        e2.close()


def test_the_plan_checks_files_before_any_model_loads(bundle_copy, monkeypatch):
    import edge_genarm.loader as loader

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the checks")

    monkeypatch.setattr(loader, "LlamaBase", no_model)
    monkeypatch.setattr(loader, "_load_arms", no_model)
    p = bundle_copy / "arms" / "beta" / "tokens.json"
    toks = json.loads(p.read_text())
    toks[5], toks[6] = toks[6], toks[5]
    p.write_text(json.dumps(toks))
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["files"]["arms/beta/tokens.json"]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TokenizerMismatchError, match="ARM 'beta'.*token id 5"):
        load(str(bundle_copy))
    with pytest.raises(ConfigError, match="chat template in the chat_template given does not work"):
        load(str(bundle_copy), ["alpha"], chat_template="{% for m in messages %}")
    with pytest.raises(ConfigError, match="ARM weight for 'alpha' must be a finite number"):
        load(str(bundle_copy), {"alpha": "lots"})
