"""`edge-genarm eval`: method specs, the weight grid, resume, the summary's statistics, plots."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edge_genarm import evaluate as E
from edge_genarm import guidance as G
from edge_genarm.cli import main
from edge_genarm.errors import ConfigError, EdgeGenarmError
from edge_genarm.records import DataError

ARMS = ["alpha", "beta"]


def test_method_specs():
    m = E.parse_method("alpha=0.5", ARMS)
    assert m.kind == "genarm" and m.weights == {"alpha": 0.5, "beta": 0.0} and not m.nudge
    assert E.parse_method("alpha=1,beta=-0.5+nudge", ARMS).weights == {"alpha": 1.0, "beta": -0.5}
    assert E.parse_method("alpha=0", ARMS).kind == "unguided"  # every weight 0: the base alone
    n = E.parse_method("nudge", ARMS, has_nudges=True)
    assert n.kind == "unguided" and n.nudge
    b = E.parse_method("bon:4", ARMS)
    assert (b.kind, b.n, b.scorer) == ("bon", 4, "alpha")
    a = E.parse_method("args:5:0.5", ARMS, has_rm=True)
    assert (a.kind, a.n, a.w, a.scorer) == ("args", 5, 0.5, "rm")
    o = E.parse_method("alpha=1@dry_multiplier=0,repeat_last_n=32", ARMS)
    assert o.label == "alpha=1@dry_multiplier=0,repeat_last_n=32" and o.weights["alpha"] == 1.0
    assert o.sampling == {"dry_multiplier": 0.0, "repeat_last_n": 32} and isinstance(o.sampling["repeat_last_n"], int)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("greedy:3", "unknown method 'greedy:3': use unguided, nudge"),
        ("gamma=1", "no ARM 'gamma' \\(it has: alpha, beta\\)"),
        ("alpha=abc", "'abc' is not a number"),
        ("alpha=nan", "weights must be finite"),
        ("bon:x", "write bon:N with N an integer"),
        ("bon:1", "N must be at least 2"),
        ("bon:4:gamma", "unknown scorer 'gamma'"),
        ("bon:4:rm", "no reward model: train one with `edge-genarm train-rm`"),
        ("args:5", "ARGS scores candidates with a reward model and the bundle has none"),
        ("alpha", "unknown method 'alpha'"),
        ("alpha=1@warmth=3", "'warmth=3' is not a sampling setting: use KEY=V with KEY one of temperature"),
        ("alpha=1@top_p=2", "top_p must be in"),
    ],
)
def test_bad_method_specs_name_the_fix(spec, match):
    with pytest.raises(ConfigError, match=match):
        E.parse_method(spec, ARMS)


def test_weight_grid_bookkeeping():
    grid = E.expand_grid(["alpha=0,0.5,1", "beta=0,1"], ARMS)
    assert [m.label for m in grid] == [
        "alpha=0,beta=0", "alpha=0,beta=1", "alpha=0.5,beta=0", "alpha=0.5,beta=1", "alpha=1,beta=0", "alpha=1,beta=1",
    ]  # fmt: skip
    assert [m.weights for m in grid][3] == {"alpha": 0.5, "beta": 1.0}
    assert grid[0].kind == "unguided" and all(m.kind == "genarm" for m in grid[1:])
    assert len({m.label for m in grid}) == 6
    assert E.expand_grid([], ARMS) == []  # no axes: no methods (not one empty combination)
    with pytest.raises(ConfigError, match="no ARM 'gamma'"):
        E.expand_grid(["gamma=0,1"], ARMS)
    with pytest.raises(ConfigError, match="given twice"):
        E.expand_grid(["alpha=0,1", "alpha=1"], ARMS)
    with pytest.raises(ConfigError, match="write NAME=W1,W2"):
        E.expand_grid(["alpha"], ARMS)


def test_metrics_and_pareto():
    assert E.distinct_bigram_ratio("a b a b a b") == pytest.approx(2 / 5)
    assert E.distinct_bigram_ratio("one") == 1.0
    assert E.pareto([(0, 1), (1, 0), (0.5, 0.5), (0.2, 0.2), (1, 0)]) == [(0, 1), (0.5, 0.5), (1, 0)]
    assert E.seed_for(0, 3) == E.seed_for(0, 3) != E.seed_for(0, 4)  # batch.record_seed


def _cfg(prompts, **kw):
    base = dict(weights="w", prompts=str(prompts), skip=0, n_prompts=3, methods=[], judges=["length"],
                max_tokens=6, seed=0)  # fmt: skip
    return E.EvalConfig(**{**base, **kw})


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["Hello", "Tell me a story", "Why?"]))
    return p


def test_run_resumes_and_refuses_other_settings(engine, prompts, tmp_path, monkeypatch):
    items = [(0, "Hello"), (1, "Tell me a story"), (2, "Why?")]
    arm = next(iter(engine.arms))
    methods = [E.parse_method("unguided", list(engine.arms)), E.parse_method(f"{arm}=1", list(engine.arms))]
    out = tmp_path / "ev"
    rows, report = E.evaluate(engine, _cfg(prompts), items, methods, out, "cmd", progress=False)
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and {r["seed"] for r in recs} == {E.seed_for(0, i) for i in range(3)}
    # the same prompt has the same seed under every method: paired
    assert all(r["seed"] == E.seed_for(0, r["prompt_index"]) for r in recs)

    calls = []
    real = E.run_method
    monkeypatch.setattr(E, "run_method", lambda *a, **k: calls.append(a[1].label) or real(*a, **k))
    E.evaluate(engine, _cfg(prompts), items, methods, out, "cmd", progress=False)
    assert calls == []  # everything was there: nothing decoded again
    more = [*methods, E.parse_method(f"{arm}=0.5", list(engine.arms))]
    rows2, _ = E.evaluate(engine, _cfg(prompts), items, more, out, "cmd", progress=False)
    assert calls == [f"{arm}=0.5"] * 3 and len(rows2) == 3
    assert rows2[:2] == rows[:2]  # resumed rows are the same numbers
    with pytest.raises(ConfigError, match="holds an evaluation made with other settings"):
        E.evaluate(engine, _cfg(prompts, max_tokens=7), items, methods, out, "cmd", progress=False)
    f = out / "eval.json"
    assert json.loads(f.read_text())["dry_auto"] == G.DRY_AUTO_RULE
    f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "dry_auto"}))
    with pytest.raises(ConfigError, match=r"made when DRY 'auto' was 0.8 \(now 0.8 x \(1 \+ sum \|w\|\)\)"):
        E.evaluate(engine, _cfg(prompts), items, methods, out, "cmd", progress=False)  # a folder from before
    kept = [x for x in (out / "records.jsonl").read_text().splitlines() if not E._auto_dry_label(json.loads(x)["method"])]
    assert kept and len(kept) < len(rows2) * 3  # the unguided records stay, the steered ones go
    (out / "records.jsonl").write_text("\n".join(kept) + "\n")
    E.evaluate(engine, _cfg(prompts), items, methods[:1], out, "cmd", progress=False)  # nothing DRY touched: resumes
    assert json.loads(f.read_text())["dry_auto"] == G.DRY_AUTO_RULE
    labels = ["unguided", "bon:4", "args:5:0.5", "a=1@dry_multiplier=0", "a=1", "nudge", "a=1@temperature=0.7"]
    assert [E._auto_dry_label(x) for x in labels] == [False, False, False, False, True, True, True]


def test_torn_last_record_is_redone(engine, prompts, tmp_path):
    items = [(0, "Hello"), (1, "Why?")]
    m = [E.parse_method("unguided", list(engine.arms))]
    out = tmp_path / "ev"
    E.evaluate(engine, _cfg(prompts), items, m, out, "cmd", progress=False)
    f = out / "records.jsonl"
    whole = f.read_bytes()
    f.write_bytes(whole[: len(whole) - 10])  # killed mid-write
    E.evaluate(engine, _cfg(prompts), items, m, out, "cmd", progress=False)
    texts = [json.loads(x)["text"] for x in f.read_text().splitlines()]
    assert texts == [json.loads(x)["text"] for x in whole.decode().splitlines()]  # redone, same seed: same text


def test_summary_statistics_match_numpy():
    recs = []
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    for i in range(8):
        for label, s, text in (("unguided", a[i], "x y z w"), ("alpha=1", b[i], "x x x x x x x")):
            recs.append({"prompt_index": i, "method": label, "scores": {"j": float(s)}, "text": text, "n_tokens": 4 + i,
                         "finished": i % 2 == 0, "loops": E.distinct_bigram_ratio(text) < 0.6, "nll": float(i),
                         "seconds": 0.5, "forwards": 4 + i})  # fmt: skip
    methods = [E.parse_method("unguided", ARMS), E.parse_method("alpha=1", ARMS)]
    for r in recs:  # a judge named like a column ("tokens": -token count) keeps its own figures
        r["scores"]["tokens"] = -2.0 * r["n_tokens"]
    base, arm = E.summarize(recs, methods, ["j", "tokens"])
    assert base["gen_tokens"][0] == pytest.approx(np.mean([4 + i for i in range(8)]))
    assert base["tokens"][0] == pytest.approx(-2 * base["gen_tokens"][0])
    assert "| generated |" in E.format_table([base, arm], ["j", "tokens"])
    d = b - a
    assert arm["j_diff"][0] == pytest.approx(d.mean())
    assert arm["j_diff"][1] == pytest.approx(d.std(ddof=1) / np.sqrt(8))
    assert base["j"][1] == pytest.approx(a.std(ddof=1) / np.sqrt(8))
    assert arm["loop_rate"] == 1.0 and base["loop_rate"] == 0.0
    assert arm["blank_rate"] == 0.0
    recs[1]["text"] = "\n\n \n\n"  # blank lines: no bigram to repeat, but no reply either
    recs[3]["text"] = "word"
    assert E.summarize(recs, methods, ["j", "tokens"])[1]["blank_rate"] == 2 / 8
    assert base["finish_rate"] == 0.5 and base["tok_per_s"] == pytest.approx(sum(4 + i for i in range(8)) / 4.0)
    assert "j_diff" not in base


def test_plots_and_report_are_written(tmp_path):
    methods = E.expand_grid(["alpha=0,1", "beta=0,1"], ARMS)
    recs = []
    for i in range(4):
        for k, m in enumerate(methods):
            recs.append({"prompt_index": i, "method": m.label, "scores": {"a": float(k + i), "b": float(i - k)},
                         "n_tokens": 5, "finished": True, "loops": False, "nll": 1.0, "seconds": 0.1 * (k + 1),
                         "forwards": 5 * (k + 1)})  # fmt: skip
    rows = E.summarize(recs, methods, ["a", "b"])
    report = E.write_report(tmp_path, _cfg("p.jsonl", judges=["a", "b"]), rows, methods, ["a", "b"], "edge-genarm eval")
    for png in ("reward_vs_speed.png", "front.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    text = report.read_text()
    assert "![Judged reward vs speed](reward_vs_speed.png)" in text and "`alpha=1,beta=1`" in text
    assert json.loads((tmp_path / "summary.json").read_text())["rows"][3]["method"] == "alpha=1,beta=1"


def test_eval_command_end_to_end_and_bad_input(tiny_bundle, prompts, tmp_path):
    run = CliRunner().invoke
    out = tmp_path / "rep"
    arms = json.loads((tiny_bundle / "manifest.json").read_text())["arms"]
    a = next(iter(arms))
    r = run(main, ["eval", "-m", str(tiny_bundle), "--prompts", str(prompts), "-n", "2", "--max-tokens", "4",
                   "--method", "unguided", "--grid", f"{a}=0.5,1", "--judge", "length", "--judge", "keyword:the",
                   "-o", str(out), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"`{a}=1`" in (out / "report.md").read_text() and (out / "front.png").is_file()
    assert len((out / "records.jsonl").read_text().splitlines()) == 6
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for args, msg in [
        (["--prompts", str(empty)], "has no prompts"),
        (["--prompts", str(prompts), "--method", "nope:1"], "unknown method 'nope:1'"),
        (["--prompts", str(prompts), "--grid", "zeta=0,1"], "no ARM 'zeta'"),
        (["--prompts", str(prompts), "--judge", "wisdom"], "unknown judge 'wisdom'"),
    ]:
        r = run(main, ["eval", "-m", str(tiny_bundle), "-o", str(tmp_path / "bad"), "--no-progress", *args])
        assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output, r.output


def test_empty_items_and_duplicates_are_refused(engine, prompts, tmp_path):
    m = E.parse_method("unguided", list(engine.arms))
    with pytest.raises(DataError, match="no prompts to evaluate"):
        E.evaluate(engine, _cfg(prompts), [], [m], tmp_path, "cmd", progress=False)
    with pytest.raises(ConfigError, match="given twice"):
        E.evaluate(engine, _cfg(prompts), [(0, "Hi")], [m, m], tmp_path, "cmd", progress=False)
    with pytest.raises(EdgeGenarmError, match="unknown judge"):
        E.evaluate(engine, _cfg(prompts, judges=["wisdom"]), [(0, "Hi")], [m], tmp_path, "cmd", progress=False)


def test_sampling_overrides_reach_the_sampler(engine):
    m = E.parse_method("unguided@temperature=0", list(engine.arms))
    got = E.run_method(engine, m, "Tell me a story", seed=1, max_tokens=6)
    want = engine.generate("Tell me a story", seed=2, max_tokens=6, guidance=False, temperature=0.0)
    assert got["tokens"] == want.tokens  # greedy: the seed no longer matters


def test_front_grid_between_two_objectives():
    """`A:B` is the 11-point front a*s, (1-a)*s with s the two defaults summed."""
    grid = E.expand_grid(["alpha:beta"], ARMS, defaults={"alpha": 0.5, "beta": 0.25})
    assert len(grid) == 11
    assert grid[0].weights == {"alpha": 0.0, "beta": 0.75} and grid[-1].weights == {"alpha": 0.75, "beta": 0.0}
    assert grid[4].weights["alpha"] == pytest.approx(0.3) and grid[4].weights["beta"] == pytest.approx(0.45)
    assert all(abs(sum(m.weights.values()) - 0.75) < 1e-9 for m in grid)
    # both defaults 0: strength 1
    assert E.expand_grid(["alpha:beta"], ARMS)[5].weights == {"alpha": 0.5, "beta": 0.5}
    with pytest.raises(ConfigError, match="two different ARMs"):
        E.expand_grid(["alpha:alpha"], ARMS)
    with pytest.raises(ConfigError, match="no ARM 'gamma'"):
        E.expand_grid(["alpha:gamma"], ARMS)


def test_hypervolume_against_the_reference():
    from edge_genarm.report import hypervolume

    # one point: its rectangle; a dominated point adds nothing; points below the reference count for nothing
    assert hypervolume([(2.0, 3.0)]) == pytest.approx(6.0)
    assert hypervolume([(2.0, 3.0), (1.0, 1.0)]) == pytest.approx(6.0)
    assert hypervolume([(-1.0, 5.0), (2.0, -1.0)]) == 0.0
    # a staircase: (3,1) and (1,3) cover 3 + 3 - 1 (their overlap)
    assert hypervolume([(3.0, 1.0), (1.0, 3.0)]) == pytest.approx(5.0)
    # brute force on a grid of cells agrees
    pts = [(0.5, 2.5), (1.5, 2.0), (2.5, 0.5), (1.0, 1.0)]
    cells = sum(1 for i in range(300) for j in range(300)
                if any((i + 0.5) / 100 < x and (j + 0.5) / 100 < y for x, y in pts))  # fmt: skip
    assert hypervolume(pts) == pytest.approx(cells / 1e4, abs=0.02)


def test_front_points_are_labelled_by_one_arms_weight_even_where_it_is_zero(tmp_path, monkeypatch):
    """A grid row's weights omit zeros ({'b': 1.0} for a=0,b=1): every label is still a's weight."""
    pytest.importorskip("matplotlib")
    from edge_genarm import report

    texts = {}

    def keep(fig, path):
        ax = fig.axes[0]
        texts["labels"] = [t.get_text() for t in ax.texts]
        texts["title"] = ax.get_title()

    monkeypatch.setattr(report, "_save", keep)
    rows = [{"method": "unguided", "kind": "unguided", "weights": {}}]
    for a in (0.0, 0.2, 1.0):
        w = {k: v for k, v in (("a", a), ("b", round(1 - a, 1))) if v}
        rows.append({"method": f"a={a:g},b={1 - a:g}", "kind": "genarm", "weights": w,
                     "x_diff": (a, 0.1), "y_diff": (1 - a, 0.1)})  # fmt: skip
    report.plot_front(rows, "x", "y", tmp_path / "front.png")
    assert sorted(texts["labels"]) == ["0", "0.2", "1"] and "weight of 'a'" in texts["title"]


def test_share_judged_positive_is_paired_like_numpy():
    """The share of replies VADER calls positive (compound >= 0.05) and AFINN calls positive (> 0),
    and the paired change in points, against a direct count."""
    from edge_genarm.report import format_positive_table

    rng = np.random.default_rng(1)
    a, b = rng.uniform(-1, 1, size=20), rng.uniform(-1, 1, size=20)
    a[0], b[0] = 0.05, 0.049  # at the threshold: positive, not positive
    recs = []
    for i in range(20):
        for label, s in (("unguided", a[i]), ("alpha=1", b[i])):
            recs.append({"prompt_index": i, "method": label, "scores": {"sentiment": float(s), "afinn": float(-s)},
                         "n_tokens": 4, "finished": True, "loops": False, "nll": 1.0, "seconds": 0.5,
                         "forwards": 4})  # fmt: skip
    methods = [E.parse_method("unguided", ARMS), E.parse_method("alpha=1", ARMS)]
    base, arm = E.summarize(recs, methods, ["sentiment", "afinn"])
    pa, pb = (a >= 0.05).astype(float), (b >= 0.05).astype(float)
    assert base["sentiment_positive"] == pytest.approx(pa.mean()) and arm["sentiment_positive"] == pytest.approx(pb.mean())
    d = pb - pa
    assert arm["sentiment_positive_diff"][0] == pytest.approx(d.mean())
    assert arm["sentiment_positive_diff"][1] == pytest.approx(d.std(ddof=1) / np.sqrt(20))
    assert arm["afinn_positive"] == pytest.approx((-b > 0).mean())
    table = format_positive_table([base, arm], ["sentiment", "afinn"])
    assert f"{100 * d.mean():+.1f} ± {100 * d.std(ddof=1) / np.sqrt(20):.1f}" in table
    assert format_positive_table([base, arm], ["tokens"]) == ""
