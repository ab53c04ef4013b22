"""batch.py: seeds, records, reset, resume, and the `batch` command on the tiny bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_genarm.batch import (
    BatchWork,
    Setting,
    distinct_bigram_ratio,
    parse_setting,
    record_key,
    record_seed,
    run_batch,
    run_record,
)
from edge_genarm.errors import ConfigError

PROMPTS = ["Hi there", "Rain?", "Tell me a story about a cat", "Why is the sky blue?"]


def no_timings(recs):
    return {record_key(r): {k: v for k, v in r.items() if k != "timings"} for r in recs}


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_seed_is_a_stable_hash_of_seed_index_sample():
    import hashlib

    want = int.from_bytes(hashlib.blake2b(b"7:3:1", digest_size=8).digest(), "little") & (2**63 - 1)
    assert record_seed(7, 3, 1) == want
    seeds = {record_seed(s, i, j) for s in range(3) for i in range(50) for j in range(4)}
    assert len(seeds) == 3 * 50 * 4  # no collisions where a linear formula would have some
    assert all(0 <= s < 2**63 for s in seeds)


def test_distinct_bigrams_and_settings():
    assert distinct_bigram_ratio("a b a b a b") == pytest.approx(2 / 5)
    assert distinct_bigram_ratio("one") == 1.0
    s = parse_setting("alpha=0.5+nudge", ["alpha", "beta"])
    assert s.weights == {"alpha": 0.5, "beta": 0.0} and s.nudge and s.label == "alpha=0.5+nudge"
    with pytest.raises(ConfigError, match="unknown ARM 'gamma'"):
        parse_setting("gamma=1", ["alpha"])
    with pytest.raises(ConfigError, match="-k must be at least 1"):
        BatchWork(k=0)
    with pytest.raises(ConfigError, match="unknown judge"):
        BatchWork(judges=("vibes",))


def test_reset_empties_every_cache_and_matches_a_fresh_engine(engine, tiny_bundle):
    from edge_genarm import load

    w = {"alpha": 1.0, "beta": 0.5}
    engine.generate("Something else entirely, quite long", max_tokens=6, seed=1, weights=w)
    assert engine.base.tokens and all(a.tokens for a in engine.arms.values())
    engine.reset()
    assert engine.base.tokens == [] and all(a.tokens == [] for a in engine.arms.values())
    after = engine.generate(PROMPTS[2], max_tokens=12, seed=5, weights=w)
    fresh = load(str(tiny_bundle), n_ctx=512)
    try:
        ref = fresh.generate(PROMPTS[2], max_tokens=12, seed=5, weights=w)
    finally:
        fresh.close()
    assert after.tokens == ref.tokens
    assert [r.combined_logprob for r in after.records] == [r.combined_logprob for r in ref.records]


def test_record_fields_and_nll_against_a_separate_decode(engine):
    s = Setting("alpha=1", {"alpha": 1.0, "beta": 0.0})
    rec = run_record(
        engine, 3, PROMPTS[3], s, seed=11, sample=2, max_tokens=10, judges={"len": lambda p, t: 1.5}
    )
    assert (
        rec["prompt_index"] == 3 and rec["sample"] == 2 and rec["seed"] == 11 and rec["setting"] == "alpha=1"
    )
    assert rec["weights"] == {"alpha": 1.0, "beta": 0.0} and rec["scores"] == {"len": 1.5}
    assert rec["n_tokens"] == len(rec["tokens"]) > 0 and rec["finish_reason"] in ("stop", "length")
    assert rec["nudge"] is None and rec["loops"] == (rec["distinct_bigrams"] < 0.6)
    json.dumps(rec)  # JSON-able as is
    # log p_base of each sampled token, decoding the prompt then the reply one token per call
    base = engine.base
    base.reset()
    ids = engine.tokenize_prompt(engine.format_prompt(PROMPTS[3]))
    logits = base.prefill(ids)
    lps = []
    for t in rec["tokens"]:
        z = np.asarray(logits, dtype=np.float64)
        lps.append(z[t] - (z.max() + np.log(np.exp(z - z.max()).sum())))
        logits = base.step(t)
    assert rec["nll"] == pytest.approx(-np.mean(lps), rel=1e-5)


def test_records_do_not_depend_on_order_or_split_and_resume(engine, tmp_path):
    items = list(enumerate(PROMPTS))
    settings = [
        parse_setting("unguided", ["alpha", "beta"]),
        parse_setting("alpha=1,beta=0.5+nudge", ["alpha", "beta"]),
    ]
    work = BatchWork(seed=3, k=2, max_tokens=8, judges=("length", "tokens"))
    whole = tmp_path / "whole.jsonl"
    st = run_batch(engine, items, settings, whole, work=work, progress=False)
    assert st["records"] == st["tasks"] == 16 and st["already_done"] == 0
    recs = read(whole)
    # settings of one prompt share its seed; samples differ
    by = {record_key(r): r for r in recs}
    assert (
        by[(1, "unguided", 0)]["seed"] == by[(1, "alpha=1,beta=0.5+nudge", 0)]["seed"] == record_seed(3, 1, 0)
    )
    assert by[(1, "unguided", 1)]["seed"] == record_seed(3, 1, 1)
    assert by[(1, "alpha=1,beta=0.5+nudge", 0)]["nudge"]["steps"] > 0
    assert all(r["scores"]["tokens"] == -len(engine.base.tokenize(r["text"], add_bos=False, special=False))
               for r in recs)  # fmt: skip

    # split in two shards, reversed order, interrupted after 3 records, then resumed
    split = tmp_path / "split.jsonl"
    seen = []

    def interrupt(rec):
        seen.append(rec)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(engine, items[::-1], settings[::-1], split, work=work, progress=False, on_record=interrupt)
    assert len(read(split)) == 3
    with open(split, "a") as f:
        f.write('{"prompt_index": 0, "setti')  # a torn last line, as a kill mid-write leaves
    st = run_batch(lambda: engine, items[2:], settings, split, work=work, progress=False)
    st2 = run_batch(engine, items, settings, split, work=work, progress=False)
    assert (st["already_done"], st["records"]) == (3, 5)  # the 3 made before the interruption are kept
    assert (st2["already_done"], st2["records"]) == (8, 8) and len(read(split)) == 16
    assert no_timings(read(split)) == no_timings(recs)
    # a finished run loads nothing
    st3 = run_batch(lambda: pytest.fail("loaded an engine for nothing"), items, settings, split, work=work)
    assert st3["records"] == 0 and st3["already_done"] == 16


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def batch_cli(*args):
    from click.testing import CliRunner

    from edge_genarm.cli import main

    return CliRunner().invoke(main, ["batch", *[str(a) for a in args]])


def test_batch_command_default_setting_and_resume(tiny_bundle, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "out.jsonl"
    args = ["-m", tiny_bundle, "--ctx", 512, "--prompts", prompts, "-o", out, "-n", 5, "--arm", "alpha=0.5"]
    r = batch_cli(*args, "--limit", 2, "-k", 2, "--judge", "length", "--no-progress")
    assert r.exit_code == 0, r.output
    recs = read(out)
    assert [(x["prompt_index"], x["sample"]) for x in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {x["setting"] for x in recs} == {"alpha=0.5"} and recs[0]["weights"] == {"alpha": 0.5}
    assert all(x["n_tokens"] <= 5 and "length" in x["scores"] for x in recs)
    r = batch_cli(*args, "-k", 2, "--judge", "length", "--no-progress")  # all four prompts now
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["already_done"] == 4 and len(read(out)) == 8


def test_batch_command_bad_input(tiny_bundle, tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys
    import time

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "also fine"}\n{"prompt": oops}\n')
    out = tmp_path / "o.jsonl"
    r = batch_cli("-m", tiny_bundle, "--prompts", bad, "-o", out)
    assert r.exit_code == 1 and "p.jsonl line 3 is not valid JSON" in r.output
    r = batch_cli("-m", tiny_bundle, "--prompts", bad, "-o", out, "--ray", "local")  # read before Ray starts
    assert r.exit_code == 1 and "p.jsonl line 3 is not valid JSON" in r.output
    r = batch_cli(
        "-m", tiny_bundle, "--prompts", bad, "-o", out, "--on-error", "skip", "--setting", "gamma=1"
    )
    assert r.exit_code == 1 and "unknown ARM 'gamma'" in r.output
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Hi"}\n')
    # --ray without the extra: the message names the install command
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is absent
    r = batch_cli("-m", tiny_bundle, "--prompts", good, "-o", out, "--ray", "local")
    assert r.exit_code == 1 and "pip install 'edge-genarm[ray]'" in r.output, r.output
    monkeypatch.undo()
    # an address nobody listens on: refused at once, named
    r = batch_cli("-m", tiny_bundle, "--prompts", good, "-o", out, "--ray", "127.0.0.1:1")
    assert r.exit_code == 1 and "cannot reach the Ray cluster at '127.0.0.1:1'" in r.output, r.output
    # an address that accepts connections but never answers: an error within the timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        code = f"from edge_genarm.distributed import connect; connect('127.0.0.1:{silent.getsockname()[1]}', timeout=4)"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        took = time.perf_counter() - t0
    assert p.returncode != 0 and "cannot join the Ray cluster at '127.0.0.1:" in p.stderr, p.stderr[-2000:]
    assert took < 30
    assert not out.exists()


# ---------------------------------------------------------------------------
# the cache folder under concurrent writers (Ray actors on one node share it)
# ---------------------------------------------------------------------------


def _run_together(code: str, n: int, env: dict) -> list[str]:
    """`code` in n processes started together; their stdouts (each must exit 0)."""
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(n)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return [out for out, _ in outs]


def test_memo_files_keep_every_writers_entries(tmp_path):
    import os

    env = {**os.environ, "EDGE_GENARM_CACHE": str(tmp_path / "cache")}
    data = tmp_path / "files"
    data.mkdir()
    for i in range(4):
        for j in range(12):
            (data / f"{i}-{j}.bin").write_bytes(os.urandom(2048))
    # 4 processes x 12 files: each hash lands in hashes.json by its own read-modify-write
    code = (
        "import sys; from pathlib import Path; from edge_genarm.bundle import _verified_hash\n"
        f"for j in range(12): _verified_hash(Path({str(data)!r}) / f'{{sys.argv[1]}}-{{j}}.bin')\n"
    )
    _run_together(code, 4, env)
    import hashlib

    memo = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    want = {f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in data.iterdir()}  # fmt: skip
    assert memo == want
    # the generic helper, under heavier contention: 4 x 40 updates, none lost
    code = (
        "import sys; from edge_genarm.paths import update_json\n"
        f"for j in range(40): update_json({str(tmp_path / 'm.json')!r}, lambda m: m.__setitem__(f'{{sys.argv[1]}}-{{j}}', j))\n"
    )
    _run_together(code, 4, env)
    assert len(json.loads((tmp_path / "m.json").read_text())) == 160


def test_optimized_arm_cache_made_once_under_concurrent_loads(tiny_bundle, tmp_path):
    import os

    from edge_genarm.backends.onnx_arm import OnnxARM

    arm = next((tiny_bundle / "arms").glob("*/model.onnx"))
    env = {**os.environ, "EDGE_GENARM_CACHE": str(tmp_path / "cache"), "EDGE_GENARM_ORT_CACHE": "1"}
    # CACHE_MIN_SECONDS = 0: the tiny ARM optimizes fast, but every process must try to save its copy
    code = (
        "import edge_genarm.backends.onnx_arm as m; m.CACHE_MIN_SECONDS = 0; m.CACHE_READ_BYTES_PER_S = float('inf')\n"
        f"a = m.OnnxARM({str(arm)!r}, 'a', threads=1); print(repr(float(a.prefill([1, 2, 3, 4]).astype('float64').sum())))\n"
    )
    outs = _run_together(code, 3, env)
    ref = OnnxARM(arm, "a", threads=1, cache=False)
    want = float(ref.prefill([1, 2, 3, 4]).astype("float64").sum())
    assert [float(o) for o in outs] == pytest.approx([want] * 3, rel=1e-5)
    files = sorted(p.name for p in (tmp_path / "cache" / "ort").iterdir())
    assert len(files) == 2 and files[0].endswith(".onnx") and files[1] == files[0] + ".data", files
    again = _run_together(code, 1, env)  # a later load reads the saved copy
    assert float(again[0]) == pytest.approx(want, rel=1e-5)


def test_a_local_batch_imports_no_ray_and_no_torch(tiny_bundle, tmp_path):
    import subprocess
    import sys

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    args = [
        "batch",
        "-m",
        str(tiny_bundle),
        "--prompts",
        str(prompts),
        "-o",
        str(tmp_path / "o.jsonl"),
        "-n",
        "2",
    ]
    code = (
        "import sys, json\nfrom edge_genarm.cli import main\n"
        f"main({args!r}, standalone_mode=False)\n"
        "print(json.dumps([m for m in ('ray', 'torch', 'transformers', 'optimum') if m in sys.modules]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
    assert len(read(tmp_path / "o.jsonl")) == 1


def test_progress_without_tqdm_counts_on_stderr(monkeypatch, capsys):
    import sys

    from edge_genarm.batch import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as when tqdm is not installed
    bar = Progress(2, "batch")
    bar.update(1)
    bar.update(1, pairs=1)
    bar.close()
    err = capsys.readouterr().err
    assert "batch: 1/2" in err and err.rstrip().endswith("batch: 2/2 pairs=1")
