"""--ray on one session-scoped local Ray cluster (2 CPUs): the same records, pairs and table as
a local run; a failing actor fails the run with its node's message; an interrupted run resumes."""

from __future__ import annotations

import json
import re
import time

import pytest
import ray  # the ray extra is part of the test setup (scripts/setup.sh): fail loudly without it
from click.testing import CliRunner

from edge_genarm.batch import BatchWork, parse_setting, record_key, run_batch
from edge_genarm.cli import main
from edge_genarm.errors import BundleError

PROMPTS = [f"Tell me about {w}." for w in ("cats", "rain", "tea", "maps", "bells", "wool")]


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the whole file: ray.init costs ~5 s on 2 cores. Commands given
    --ray local use the Ray this process already started."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    f = tmp_path_factory.mktemp("ray") / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return f


def cli(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def records(path):
    return {
        record_key(r): {k: v for k, v in r.items() if k != "timings"} for r in map(json.loads, open(path))
    }


@pytest.fixture(scope="module")
def local_batch(tiny_bundle, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    args = ["batch", "-m", tiny_bundle, "--ctx", 512, "--prompts", prompts, "-o", out, "-n", 8, "--seed", 4]
    cli(
        args
        + [
            "--setting",
            "unguided",
            "--setting",
            "alpha=1,beta=0.5+nudge",
            "--judge",
            "length",
            "--no-progress",
        ]
    )
    return args, out


def test_batch_on_ray_gives_the_local_records(cluster, local_batch, tmp_path):
    args, local = local_batch
    out = tmp_path / "ray.jsonl"
    ray_args = [a if a != local else out for a in args] + ["--ray", "local", "--ray-actors", 2]
    r = cli(ray_args + ["--setting", "unguided", "--setting", "alpha=1,beta=0.5+nudge", "--judge", "length"])
    assert json.loads(r.stdout.strip().splitlines()[-1])["records"] == 12
    want = records(local)
    assert len(want) == 12 and records(out) == want
    assert any(rec["nudge"] and rec["nudge"]["sites"] for rec in want.values())  # the nudge path ran too


def test_resume_after_an_interrupted_ray_run(cluster, tiny_bundle, local_batch, tmp_path):
    from edge_genarm.distributed import RayRunner
    from edge_genarm.options import LoadOptions

    _, local = local_batch
    spec = LoadOptions(str(tiny_bundle), n_ctx=512)
    arms = list(spec.arm_weights())
    settings = [parse_setting(s, arms) for s in ("unguided", "alpha=1,beta=0.5+nudge")]
    work = BatchWork(seed=4, max_tokens=8, judges=("length",))
    items = list(enumerate(PROMPTS))
    out, got = tmp_path / "resumed.jsonl", []

    def interrupt(rec):
        got.append(rec)
        if len(got) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(
            None, items, settings, out, work=work, runner=RayRunner(spec, "local", 2), on_record=interrupt
        )
    assert len(records(out)) == 4
    t0 = time.perf_counter()  # the interrupted run's actors gave their CPUs back: no wait here
    st = run_batch(None, items, settings, out, work=work, runner=RayRunner(spec, "local", 2), progress=False)
    assert time.perf_counter() - t0 < 60
    assert (st["already_done"], st["records"]) == (4, 8)
    assert records(out) == records(local)


def test_a_failing_actor_fails_the_run_with_the_nodes_message(cluster, tmp_path):
    from edge_genarm.distributed import RayRunner
    from edge_genarm.options import LoadOptions

    missing = tmp_path / "not-here" / "bundle"
    runner = RayRunner(LoadOptions(str(missing)), "local", 1)
    t0 = time.perf_counter()
    with pytest.raises(BundleError) as e:
        run_batch(None, [(0, "Hi")], [parse_setting("unguided", [])], tmp_path / "o.jsonl", runner=runner)
    assert time.perf_counter() - t0 < 60
    msg = str(e.value)
    assert f"bundle '{missing}' does not exist there" in msg and "pack build" in msg
    assert re.search(r"on node \S+ \(\d+\.\d+\.\d+\.\d+\)", msg), msg
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_prefs_and_compare_on_ray_match_local(cluster, tiny_bundle, prompts, tmp_path):
    base = [
        "prefs",
        "-m",
        tiny_bundle,
        "--prompts",
        prompts,
        "--judge",
        "length",
        "-k",
        3,
        "-n",
        6,
        "--seed",
        2,
    ]
    cli(base + ["-o", tmp_path / "local.jsonl"])
    cli(base + ["-o", tmp_path / "ray.jsonl", "--ray", "local"])
    pairs = [
        {r["prompt_index"]: r for r in map(json.loads, open(tmp_path / f))}
        for f in ("local.jsonl", "ray.jsonl")
    ]
    assert pairs[0] == pairs[1] and len(pairs[0]) >= 3

    cmp = [
        "compare",
        "-m",
        tiny_bundle,
        "--ctx",
        512,
        "--prompts",
        prompts,
        "--max-tokens",
        6,
        "--judge",
        "length",
    ]
    cmp += ["--setting", "unguided", "--setting", "alpha=1"]
    tables = [cli(cmp).stdout, cli(cmp + ["--ray", "local"]).stdout]
    diffs = [t[t.index("paired difference") :] for t in tables]  # the table above also holds tok/s
    assert diffs[0] == diffs[1]
    rows = [
        [line.split()[1] for line in t.splitlines() if line.startswith(("unguided", "alpha=1"))]
        for t in tables
    ]
    assert rows[0] == rows[1]  # the judge means


def test_actor_threads_come_from_its_cpus(cluster, tiny_bundle):
    from edge_genarm.distributed import RayRunner
    from edge_genarm.options import LoadOptions

    def work(engine, task):  # a closure: cloudpickle ships it by value
        return {
            "base": engine.base.threads,
            "arms": sorted({a.threads for a in engine.arms.values()}),
        }

    got = []
    RayRunner(LoadOptions(str(tiny_bundle), n_ctx=256), "local", 2, 1)(
        work, [{"i": i} for i in range(4)], got.append
    )
    assert len(got) == 4 and {g["base"] for g in got} == {1} and all(g["arms"] == [1] for g in got), got
