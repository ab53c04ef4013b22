"""Ray overhead vs a local run on the same cores: `edge-genarm batch` over N prompts.

    .venv/bin/python scripts/bench_ray.py --weights BUNDLE [-n 32] [--max-tokens 64] [--setting S]

Runs the same batch (same seeds) locally (one engine on every core), then on a local Ray
cluster with as many CPUs, as 1 actor x all cores and as one actor per core. Prints, per
run: wall time, cluster start (ray.init), time to the first record (actor start-up + engine
load + one reply), the per-reply cost inside the engine (records' timings), the CPU seconds
that this process and every process it started (Ray's daemons and workers) spent from the
start to the last record, and whether the records equal the local ones (timings aside). On a
machine shared with other jobs the wall times move with their load; the CPU seconds much less.
The figures feed the README's projection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def strip(path: Path) -> dict:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return {
        (r["prompt_index"], r["setting"], r["sample"]): {k: v for k, v in r.items() if k != "timings"}
        for r in recs
    }


def cpu_seconds() -> float:
    """user + system CPU seconds of this process and of every live process below it."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def one_run(name, spec, items, settings, work, out, runner=None) -> dict:
    from edge_genarm.batch import run_batch

    firsts: list[float] = []
    cpu: list[float] = []
    n_tasks = len(items) * len(settings) * work.k

    def on_record(rec) -> None:
        firsts.append(time.perf_counter())
        if len(firsts) == n_tasks:  # before a cluster started here is shut down
            cpu.append(cpu_seconds())

    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    init_s = load_s = 0.0
    engine = None
    if runner is None:
        from edge_genarm.loader import load

        engine = load(spec)
        load_s = time.perf_counter() - t0
    else:
        runner.start()
        init_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    st = run_batch(
        engine, items, settings, out, work=work, runner=runner, progress=False, on_record=on_record
    )
    end = time.perf_counter()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    engine_s = sum(r["timings"]["total_ms"] + r["timings"]["prompt_ms"] for r in recs) / 1e3
    if engine is not None:
        engine.close()
    return {
        "run": name,
        "wall_s": round(end - t0, 2),
        "ray_init_s": round(init_s, 2),
        "engine_load_s": round(load_s, 2),
        "first_record_s": round(firsts[0] - t1, 2) if firsts else None,
        "replies": st["records"],
        "engine_s_per_reply": round(engine_s / max(1, len(recs)), 3),
        "tokens_per_reply": round(sum(r["n_tokens"] for r in recs) / max(1, len(recs)), 1),
        "cpu_s": round(cpu[0] - cpu0, 1) if cpu else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--prompts", default="/work/shared/data/prompts-train.jsonl")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--setting", default=None, help="default: the bundle's ARMs at their default weights")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--ctx", type=int, default=1024)
    a = ap.parse_args()

    from edge_genarm.batch import BatchWork, default_setting, parse_setting
    from edge_genarm.distributed import RayRunner
    from edge_genarm.options import LoadOptions
    from edge_genarm.records import read_prompts

    spec = LoadOptions(str(Path(a.weights).resolve()), n_ctx=a.ctx)
    weights = spec.arm_weights()
    settings = [parse_setting(a.setting, list(weights)) if a.setting else default_setting(weights)]
    items = read_prompts(a.prompts)[: a.n]
    work = BatchWork(seed=0, max_tokens=a.max_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    runs = [("local", None)]
    runs.append((f"ray 1 actor x {a.cores} cpu", RayRunner(spec, "local", 1, a.cores)))
    if a.cores > 1:
        runs.append((f"ray {a.cores} actors x 1 cpu", RayRunner(spec, "local", a.cores, 1)))
    rows, ref = [], None
    for i, (name, runner) in enumerate(runs):
        out = tmp / f"run{i}.jsonl"
        row = one_run(name, spec, items, settings, work, out, runner)
        recs = strip(out)
        ref = recs if ref is None else ref
        row["same_records_as_local"] = recs == ref
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"weights": a.weights, "setting": settings[0].label, "prompts": len(items),
                      "max_tokens": a.max_tokens, "cores": a.cores}))  # fmt: skip


if __name__ == "__main__":
    main()
