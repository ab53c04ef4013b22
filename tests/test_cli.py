"""The command line through click's runner, and the chat REPL in a real terminal."""

import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_genarm.cli import main


def run(args, input=None):
    r = CliRunner().invoke(main, args, input=input)
    return r


COMMANDS = ["batch", "bench", "bundle", "calibrate-tau", "chat", "compare", "config", "doctor", "eval", "export",
            "generate", "pack", "prefs", "serve", "train-arm", "train-mix", "train-rm"]  # fmt: skip


def test_python_m_lists_every_command_and_imports_nothing_heavy():
    """The commands live in cli_*.py modules that cli.py registers at its end: `python -m
    edge_genarm.cli --help` must list them all, and loading them must not load the training stack."""
    import subprocess

    heavy = ("torch", "transformers", "optimum", "onnx", "fastapi", "ray")
    code = (
        "import sys, json\nfrom edge_genarm.cli import main\n"
        f"print(json.dumps([sorted(main.commands), [m for m in {heavy!r} if m in sys.modules]]))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    names, loaded = json.loads(p.stdout.strip().splitlines()[-1])
    assert names == COMMANDS and loaded == []
    out = subprocess.run([sys.executable, "-m", "edge_genarm.cli", "--help"], capture_output=True, text=True,
                         timeout=60).stdout  # fmt: skip
    assert re.findall(r"^  (\S+) ", out.split("Commands:")[1], re.M) == COMMANDS


def test_generate_json_is_reproducible(tiny_bundle):
    args = [
        "generate",
        "--weights",
        str(tiny_bundle),
        "--arm",
        "alpha=1.0",
        "--arm",
        "beta=0.5",
        "--seed",
        "4",
        "-n",
        "8",
        "--json",
        "Hello",
    ]
    a, b = run(args), run(args)
    assert a.exit_code == 0, a.output
    out = json.loads(a.output)
    assert out == json.loads(b.output) | {"timings": out["timings"]}
    assert out["weights"] == {"alpha": 1.0, "beta": 0.5}
    assert len(out["records"]) == len(out["tokens"]) <= 8
    assert set(out["records"][0]["arm_contrib"]) == {"alpha", "beta"}


def test_no_guidance_and_prompt_from_stdin(tiny_bundle):
    r = run(
        ["generate", "--weights", str(tiny_bundle), "--no-guidance", "--seed", "1", "-n", "5", "--json"],
        input="Hi from stdin",
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert all(rec["arm_contrib"] == {} for rec in out["records"])


def test_bad_values_are_named(tiny_bundle):
    r = run(["generate", "--weights", str(tiny_bundle), "--arm", "alpha=much", "Hi"])
    assert r.exit_code != 0 and "ARM weight for 'alpha' must be a number" in r.output
    r = run(["generate", "--weights", str(tiny_bundle), "--arm", "nosuch=1", "Hi"])
    assert r.exit_code != 0 and "unknown ARM 'nosuch'" in r.output
    r = run(["generate", "--weights", str(tiny_bundle), "--top-p", "0", "Hi"])
    assert r.exit_code != 0 and "top_p" in r.output
    r = run(["generate", "--weights", "/nonexistent/bundle", "Hi"])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_a_gguf_without_a_chat_template_is_prompted_raw_and_says_so(tiny_bundle, tmp_path):
    from tests.gguf_edit import parse

    bare = tmp_path / "no-template.gguf"
    bare.write_bytes(parse((tiny_bundle / "base.gguf").read_bytes()).drop("tokenizer.chat_template").to_bytes())
    args = ["generate", "--seed", "2", "-n", "4", "--json", "Hello"]
    r = run([*args, "--weights", str(bare)])
    assert r.exit_code == 0, r.output
    assert f"no chat template in {bare}: prompting raw (give one with --chat-template FILE)" in r.stderr
    assert json.loads(r.stdout)["tokens"]
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    for given in (["--weights", str(bare), "--chat-template", str(template)], ["--weights", str(tiny_bundle)]):
        r = run([*args, *given])
        assert r.exit_code == 0 and "no chat template" not in r.stderr, r.output


def test_stop_string_from_the_cli(tiny_bundle):
    base = ["generate", "--weights", str(tiny_bundle), "--seed", "9", "-n", "30", "--json", "Hi"]
    full = json.loads(run(base).output)["text"]
    stop = full[10:13]
    cut = json.loads(run(base + ["--stop", stop]).output)
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_bench_prints_every_figure(tiny_bundle):
    r = run(["bench", "--weights", str(tiny_bundle), "-n", "8", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    for key in ("unguided", "guided_sequential", "guided_parallel", "forward_bound_tok_per_s", "peak_rss_mb"):
        assert key in rep
    assert rep["guided_nudge_rollouts"]["nudge"]["rollout_tokens"] > 0 and "rollout_overhead" in rep
    assert rep["guided_sequential"]["tokens"] == 8 and set(rep["guided_sequential"]["arm_ms"]) == {
        "alpha",
        "beta",
    }


def test_chat_repl_in_a_real_terminal(tiny_bundle):
    pexpect = pytest.importorskip("pexpect")
    exe = Path(sys.executable).with_name("edge-genarm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edge_genarm.cli"]
    child = pexpect.spawn(
        cmd[0],
        cmd[1:] + ["chat", "--weights", str(tiny_bundle), "-n", "6", "--seed", "1"],
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect(">>> ")
        child.sendline("/arms")
        child.expect("alpha = 1")
        child.sendline("/set arm alpha 0.25")
        child.expect("alpha = 0.25")
        child.sendline("/set arm alpha lots")
        child.expect(r"error: an ARM weight must be a number, e.g. /set arm alpha 0.5")
        child.sendline("/set temperature abc")  # bad values are answered in words
        child.expect(r"error: temperature must be a number, e.g. /set temperature 0.7")
        child.sendline("/set top_k 2.5")
        child.expect(r"error: top_k must be a whole number, e.g. /set top_k 40")
        child.sendline("/set seed -3")
        child.expect(r"error: seed must be 0 or more")
        child.sendline("/set temperature")
        child.expect(r"error: use /set NAME VALUE")
        child.sendline("/set temperature 0.5")
        child.expect("temperature = 0.5")
        child.sendline("/set top_p 7")
        child.expect("error: top_p must be in")
        child.sendline("/frobnicate")
        child.expect("unknown command")
        child.sendline("Hello there")
        child.expect(r"\[\d+ tokens, [\d.]+ tok/s\]")
        child.sendline("/stats")  # rounded, as in the reply footer
        child.expect(r"  (\d+ tokens, [^\r\n]* per token)")
        assert not re.search(r"\d\.\d{4,}", child.match.group(1)), child.match.group(1)
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_compare_runs_every_setting_on_the_same_prompts(tiny_bundle, tmp_path):
    from edge_genarm.compare import parse_setting
    from edge_genarm.errors import ConfigError

    s = parse_setting("alpha=0.5,beta=1+nudge", ["alpha", "beta"])
    assert s.weights == {"alpha": 0.5, "beta": 1.0} and s.nudge
    assert parse_setting("unguided", ["alpha"]).weights == {"alpha": 0.0}
    with pytest.raises(ConfigError, match="unknown ARM 'gamma'"):
        parse_setting("gamma=1", ["alpha"])
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "Hi"}\n{"prompt": "Rain?"}\n')
    r = run(
        [
            "compare",
            "--weights",
            str(tiny_bundle),
            "--prompts",
            str(p),
            "--max-tokens",
            "4",
            "--setting",
            "unguided",
            "--setting",
            "alpha=1+nudge",
            "--judge",
            "length",
        ]
    )
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[-5].startswith("unguided") and lines[-4].startswith("alpha=1+nudge") and "%" in lines[-4]
    assert lines[-2].startswith("paired difference from 'unguided'") and lines[-1].startswith("alpha=1+nudge")


def test_compare_paired_difference_matches_numpy():
    import numpy as np

    from edge_genarm.compare import Setting, summarize

    replies = {"off": ["a", "a b c", "a b"], "on": ["a b", "a", "a b c d"]}  # per setting, per prompt

    def rec(label, i):
        text = replies[label][i]
        n = len(text.split())
        return {"prompt_index": i, "setting": label, "sample": 0, "n_tokens": n, "nudge": None,
                "timings": {"total_ms": 100.0}, "scores": {"len": n}}  # fmt: skip

    settings = [Setting("off", {"x": 0.0}), Setting("on", {"x": 1.0})]
    records = [rec(s.label, i) for s in settings for i in (2, 0, 1)]  # order does not matter
    rows = summarize(records, settings, ["len"])
    d = np.array([2, 1, 4]) - np.array([1, 3, 2])
    assert rows[1]["len_diff"][0] == pytest.approx(d.mean())
    assert rows[1]["len_diff"][1] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert rows[0]["tok_per_s"] == pytest.approx(6 / 0.3)


def test_chat_with_a_corrupt_arm_names_it_and_exits(tiny_bundle, tmp_path):
    import shutil

    pexpect = pytest.importorskip("pexpect")
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    arm = bad / "arms" / "alpha" / "model.onnx"
    arm.write_bytes(arm.read_bytes()[:1000])
    exe = Path(sys.executable).with_name("edge-genarm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edge_genarm.cli"]
    child = pexpect.spawn(cmd[0], cmd[1:] + ["chat", "--weights", str(bad)], encoding="utf-8", timeout=60)
    child.logfile_read = log = io.StringIO()
    try:
        child.expect(">>> ")  # the prompt comes up while the models load
        child.sendline("Hello")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1
    assert "Error:" in log.getvalue() and "arms/alpha/model.onnx" in log.getvalue(), log.getvalue()


def test_bench_cost_curve_runs_stand_ins_past_the_bundles_arms(tiny_bundle):
    from edge_genarm.bundle import Bundle

    r = run(["bench", "--weights", str(tiny_bundle), "-n", "4", "--repeats", "1", "--objectives", "3",
             "--no-modes", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)["cost_curve"]
    assert c["objectives"] == ["alpha", "beta", "alpha_standin2"]  # the tiny bundle has two ARMs
    assert set(c["modes"]) == {"unguided"} | {f"{k} {m}" for k in (1, 2, 3) for m in ("exact", "fast")}
    assert c["modes"]["unguided"]["vs_unguided"] == 1.0 and c["modes"]["unguided"]["guided_fraction"] == 0.0
    assert all(c["modes"][f"{k} exact"]["guided_fraction"] == 1.0 for k in (1, 2, 3))
    assert set(c["ms_per_objective"]) == {"exact", "fast"}
    assert len(Bundle.open(tiny_bundle).arms) == 2  # the stand-ins lived in a temporary view only
    text = run(["bench", "--weights", str(tiny_bundle), "-n", "4", "--repeats", "1", "--objectives", "1",
                "--no-modes"]).output  # fmt: skip
    assert "cost curve: 1..1 objectives (alpha)" in text and "each objective adds" not in text
