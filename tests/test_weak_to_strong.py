"""Weak-to-strong (`--base`, `base=`): a bundle's ARMs guide another base that shares their
tokenizer. The other base here is a SmolLM2-vocabulary model of another shape, made with the
real converter from a random init; a base of another vocabulary is refused with the first
differing token id."""

import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_genarm import load
from edge_genarm.bundle import Bundle
from edge_genarm.errors import BundleError, ConfigError, TokenizerMismatchError
from edge_genarm.gguf import read_gguf
from edge_genarm.loader import choose_tap
from edge_genarm.options import LoadOptions
from edge_genarm.plan import make_plan

torch = pytest.importorskip("torch")  # the second base comes from a random Hugging Face init

from tests.test_tap import tapped  # noqa: E402, F401  (a bundle whose heads share a tapped trunk)


@pytest.fixture(scope="module")
def strong(tmp_path_factory) -> Path:
    """A base of another shape than the tiny bundle's (4 layers, hidden 128 vs 2 and 64), same vocabulary."""
    from edge_genarm.export.converter import convert_hf_to_gguf

    from tests.tiny import build_tiny_hf

    root = tmp_path_factory.mktemp("strong")
    build_tiny_hf(root / "hf", seed=7, layers=4, hidden=128)
    convert_hf_to_gguf(root / "hf", root / "strong.gguf", "f32")
    return root / "strong.gguf"


@pytest.fixture(scope="module")
def other_vocab(strong, tmp_path_factory) -> Path:
    """The strong base with token strings 300 and 301 swapped: another vocabulary, same size."""
    from tests.gguf_edit import ARRAY, STRING, parse

    g = parse(strong.read_bytes())
    tokens = g.get("tokenizer.ggml.tokens").value()
    tokens[300], tokens[301] = tokens[301], tokens[300]
    g.set("tokenizer.ggml.tokens", ARRAY, (STRING, tokens))
    p = tmp_path_factory.mktemp("other-vocab") / "other-vocab.gguf"
    p.write_bytes(g.to_bytes())
    return p


def test_the_arms_guide_a_base_of_another_shape(tiny_bundle, strong):
    assert read_gguf(strong).get("llama.block_count") == 4
    assert read_gguf(tiny_bundle / "base.gguf").get("llama.block_count") == 2
    guided = load(str(tiny_bundle), ["alpha=1", "beta=0.5"], base=str(strong), n_ctx=256)
    alone = load(str(strong), n_ctx=256)
    try:
        assert guided.base.path == strong and guided.weights == {"alpha": 1.0, "beta": 0.5}
        kw = dict(max_tokens=8, seed=3)
        unguided, ref = guided.generate("Hello", guidance=False, **kw), alone.generate("Hello", **kw)
        assert unguided.tokens == ref.tokens  # the base that runs is the strong one
        assert [r.base_logprob for r in unguided.records] == pytest.approx([r.base_logprob for r in ref.records])
        c = guided.generate("Hello", **kw)
        assert all(set(r.arm_contrib) == {"alpha", "beta"} for r in c.records)
        assert any(v != 0.0 for r in c.records for v in r.arm_contrib.values())
    finally:
        guided.close()
        alone.close()


def test_a_base_of_another_vocabulary_is_refused_with_the_first_differing_id(tiny_bundle, other_vocab):
    with pytest.raises(
        TokenizerMismatchError,
        match=r"ARM 'alpha' uses a different tokenizer from base 'other-vocab.gguf': token id 300 .*--base must",
    ):
        load(str(tiny_bundle), base=str(other_vocab))
    with pytest.raises(BundleError, match=r"--base '.*nope.gguf' is not a file"):
        load(str(tiny_bundle), base=str(other_vocab.parent / "nope.gguf"))


def test_heads_on_a_shared_trunk_run_their_graph_over_another_base(tapped, strong):  # noqa: F811
    bundle, _, _ = tapped
    own, other = make_plan(Bundle.open(bundle)), make_plan(Bundle.open(bundle), base=strong)
    assert own.taps and own.own_base  # the gate passed on the bundle's own base
    assert other.taps == {} and not other.own_base and other.base == strong
    assert choose_tap(other, "auto") is None
    with pytest.raises(ConfigError, match=r"--trunk base: the ARMs guide --base .*use --trunk graph"):
        load(str(bundle), base=str(strong), trunk="base", n_ctx=256)
    e = load(str(bundle), base=str(strong), n_ctx=256)
    try:
        c = e.generate("Tell me a story.", max_tokens=6, seed=1)
        assert len(c.tokens) == 6 and set(c.records[0].arm_contrib) == {"a", "b"}
    finally:
        e.close()


def test_generate_with_base_on_the_command_line(tiny_bundle, strong, other_vocab):
    from edge_genarm.cli import main

    args = ["generate", "--weights", str(tiny_bundle), "--seed", "3", "-n", "6", "--json", "Hello"]
    r = CliRunner().invoke(main, [*args, "--base", str(strong)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["weights"] == {"alpha": 1.0, "beta": 1.0} and 0 < len(out["tokens"]) <= 6
    assert f"the ARMs of '{tiny_bundle}' guide base '{strong}'" in r.stderr
    r = CliRunner().invoke(main, [*args, "--base", str(other_vocab)])
    assert r.exit_code == 1 and "token id 300" in r.output and r.stdout == ""


def test_the_options_carry_the_base_to_another_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    opts = LoadOptions("bundle", ("alpha=0.5",), base="strong.gguf", chat_template=Path("t.jinja"))
    moved = pickle.loads(pickle.dumps(opts.portable()))
    assert moved.base == str(tmp_path / "strong.gguf") and moved.weights == str(tmp_path / "bundle")
    assert moved.chat_template == "{{ messages[0].content }}" and moved.arms == ("alpha=0.5",)
    with pytest.raises(ConfigError, match="--base is empty"):
        LoadOptions("bundle", base=" ")
    with pytest.raises(ConfigError, match=r"n_ctx \(--ctx\) must be an integer >= 1"):
        LoadOptions("bundle", n_ctx=0)
