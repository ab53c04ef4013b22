"""Preference pairs: judges, pairing, append/resume, judge failures, the CLI on the tiny bundle."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from edge_genarm.export.prefs import DataError, done_prompts, make_judge, make_pairs, pick_pair, read_prompts

from edge_genarm.errors import ConfigError


class FakeEngine:
    """generate() returns a text chosen by the seed, from a fixed list per prompt."""

    def __init__(self, texts: dict[str, list[str]]):
        self.texts, self.calls, self.fresh = texts, [], False

    def reset(self):
        self.fresh = True

    def generate(self, prompt, seed, guidance, max_tokens, temperature):
        assert guidance is False and self.fresh  # every sample starts from empty KV caches
        self.fresh = False
        self.calls.append((prompt, seed))
        options = self.texts[prompt]
        text = options[seed % len(options)]
        return SimpleNamespace(text=text, finish_reason="length" if text.endswith("...") else "stop")


def test_builtin_judges():
    assert (
        make_judge("sentiment")("p", "I love this, wonderful!")
        > 0
        > make_judge("sentiment")("p", "awful, hate it")
    )
    afinn = make_judge("afinn")
    assert afinn("p", "I love this, wonderful!") > 0 > afinn("p", "awful, hate it")
    assert afinn("p", "good") == 2 * afinn("p", "good day")  # per word: length alone does not count
    assert make_judge("length")("p", "one two three") == -3.0
    assert make_judge("regex:a+")("p", "aa b a") == 2.0
    assert make_judge("keyword:Sun,moon")("p", "The sun and the MOON, sunny") == 2.0


def test_python_judge_and_unknown_specs(tmp_path, monkeypatch):
    (tmp_path / "myjudge.py").write_text("def score(prompt, response):\n    return len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_judge("python:myjudge:score")("p", "abc") == 3
    with pytest.raises(ConfigError, match="define nope"):
        make_judge("python:myjudge:nope")
    with pytest.raises(ConfigError, match="unknown judge 'vibes'"):
        make_judge("vibes")
    with pytest.raises(ConfigError, match="does not compile"):
        make_judge("regex:(")


def test_pick_pair_skips_ties():
    assert pick_pair(["a", "b", "c"], [0.1, 0.9, 0.5]) == (1, 0)
    assert pick_pair(["a", "b"], [1.0, 1.0]) is None
    assert pick_pair(["a", "a"], [1.0, 2.0]) is None


def test_pairs_are_written_ties_skipped_and_resumed(tmp_path):
    prompts = [(0, "p0"), (1, "p1"), (2, "p2")]
    eng = FakeEngine({"p0": ["short", "a much longer answer"], "p1": ["same", "same"], "p2": ["x y...", "x"]})
    out = tmp_path / "pairs.jsonl"
    judge = make_judge("length")
    stats = make_pairs(eng, prompts, judge, "length", out, k=2, progress=False)
    assert stats["pairs"] == 2 and stats["ties"] == 1
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0] == {
        "prompt": "p0",
        "chosen": "short",
        "rejected": "a much longer answer",
        "scores": {"chosen": -1.0, "rejected": -4.0},
        "judge": "length",
        "prompt_index": 0,
        "finish": {"chosen": "stop", "rejected": "stop"},
    }
    assert lines[1]["finish"] == {"chosen": "stop", "rejected": "length"}  # "x y..." was cut
    with open(out, "a") as f:  # a run killed mid-write leaves a torn line
        f.write('{"prompt": "p9", "cho')
    assert done_prompts(out) == {0, 2} and out.read_text().endswith("}\n")
    eng.calls.clear()
    again = make_pairs(eng, prompts, judge, "length", out, k=2, progress=False)
    assert again["already_done"] == 2 and again["pairs"] == 0 and {p for p, _ in eng.calls} == {"p1"}
    assert len(out.read_text().splitlines()) == 2


def test_failing_judge_names_judge_and_prompt(tmp_path):
    def judge(prompt, response):
        if prompt == "p1":
            raise RuntimeError("boom")
        return len(response)

    eng = FakeEngine({"p0": ["a", "bb"], "p1": ["a", "bb"]})
    out = tmp_path / "o.jsonl"
    with pytest.raises(DataError, match=r"judge 'mine' failed on prompt 1 \(RuntimeError: boom\)"):
        make_pairs(eng, [(0, "p0"), (1, "p1")], judge, "mine", out, on_error="stop", progress=False)
    stats = make_pairs(eng, [(0, "p0"), (1, "p1")], judge, "mine", out, on_error="skip", progress=False)
    assert stats["judge_errors"] == 1 and stats["already_done"] == 1
    with pytest.raises(DataError, match="returned nan on prompt 0"):
        make_pairs(eng, [(0, "p0")], lambda p, r: float("nan"), "nan", tmp_path / "n.jsonl", on_error="stop")


def test_bad_prompt_lines(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "a"}\n\n{bad\n{"text": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl line 3 is not valid JSON"):
        read_prompts(f)
    stats = {}
    assert read_prompts(f, "skip", stats) == [(0, "a"), (4, "c")] and stats["bad_lines"] == 2
    with pytest.raises(ConfigError, match="-k must be at least 2"):
        make_pairs(FakeEngine({}), [], len, "x", tmp_path / "o.jsonl", k=1)


def test_cli_prefs_on_tiny_bundle(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from edge_genarm.cli import main

    f = tmp_path / "prompts.jsonl"
    f.write_text(
        "".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in ("cats", "rain", "tea"))
    )
    out = tmp_path / "pairs.jsonl"
    args = ["prefs", "--weights", str(tiny_bundle), "--prompts", str(f), "--judge", "length", "-k", "3"]
    r = CliRunner().invoke(main, args + ["-o", str(out), "-n", "12"])
    assert r.exit_code == 0, r.output
    stats = json.loads(re.search(r'\{"prompts".*\}', r.output).group(0))  # after tqdm's \r lines
    assert stats["pairs"] + stats["ties"] + stats["judge_errors"] == 3
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        assert rec["scores"]["chosen"] > rec["scores"]["rejected"]
    r = CliRunner().invoke(main, args + ["-o", str(out), "-n", "12", "--judge", "vibes"])
    assert r.exit_code == 1 and "unknown judge 'vibes'" in r.output


def test_tokens_judge_and_require_finished(tmp_path):
    judge = make_judge("tokens", tokenize=lambda s: s.split("-"))
    assert judge("p", "a-b-c") == -3.0  # counted in the tokenizer's pieces, not in words
    with pytest.raises(ConfigError, match="needs the base model's tokenizer"):
        make_judge("tokens")
    # p0's shortest reply was cut at max_tokens ("...": finish "length"): it teaches no stop
    eng = FakeEngine({"p0": ["x...", "a much longer answer"], "p1": ["fine", "a longer answer here"]})
    out = tmp_path / "pairs.jsonl"
    stats = make_pairs(eng, [(0, "p0"), (1, "p1")], make_judge("length"), "length", out, k=2,
                       progress=False, require_finished=True)  # fmt: skip
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["unfinished"] == 1 and [x["prompt"] for x in lines] == ["p1"]
    assert lines[0]["finish"]["chosen"] == "stop"
