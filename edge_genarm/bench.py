"""`edge-genarm bench`: the speed figures, measured in one process, one run.

Every mode decodes the same prompt for the same number of tokens with greedy
sampling and EOS ignored, so all modes do the same work. Ratios are what to
quote: these machines are noisy.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from .errors import ConfigError
from .guidance import SamplingParams
from .nudge import NudgeConfig


def _run(engine, prompt, n, weights, guidance, nudge=None, exact=True):
    c = engine.generate(
        prompt,
        max_tokens=n,
        sampling=SamplingParams(0.0, 0, 1.0, 0.0),
        seed=0,
        weights=weights,
        guidance=guidance,
        ignore_eos=True,
        nudge=nudge,
        exact=exact,
    )
    out = c.timings.summary()
    if c.nudge is not None:
        out["nudge"] = c.nudge.summary()
    return out


def _best(engine, prompt, n, repeats, guidance, nudge=None):
    runs = [_run(engine, prompt, n, None, guidance, nudge) for _ in range(repeats)]
    return max(runs, key=lambda s: s["tok_per_s"])


def run_bench(load_engine, prompt: str, n: int, repeats: int = 2, trunk: str = "auto") -> dict:
    """`load_engine(parallel, trunk)` -> Engine. Sequential mode gives each forward all the
    cores; parallel mode splits them and overlaps the forwards (engine.split_threads). Both run
    shared trunks as graphs; where the bundle lets heads run on the base's own layer
    (loader.choose_tap), a third engine measures that: `guided_base_tap`, and `unguided_tap`
    (the base with the eval callback installed, no ARM: what the tap costs the base)."""
    engine = load_engine(False, "graph")
    unguided = _best(engine, prompt, n, repeats, guidance=False)
    report = {
        "base": engine.base.path.name,
        "arms": dict(engine.weights),
        "tokens": n,
        "base_threads": engine.base.threads,
        "unguided": unguided,
    }
    if engine.arms:
        report["guided_sequential"] = _best(engine, prompt, n, repeats, guidance=True)
        # nudging at the default tau, same bundle and mode: its overhead over GenARM alone
        nudged = _best(engine, prompt, n, repeats, guidance=True, nudge=NudgeConfig())
        report["guided_nudge"] = nudged
        seq = report["guided_sequential"]
        report["nudge_overhead"] = seq["tok_per_s"] / nudged["tok_per_s"] - 1
        # the same, from the Python-side cost alone (the forwards are identical): less noisy
        report["nudge_overhead_python"] = (nudged["python_ms"] - seq["python_ms"]) * seq["tok_per_s"] / 1e3
        # with forward-only verification (3 candidates, 4-token rollouts): what it costs
        rolled = _best(engine, prompt, n, 1, guidance=True, nudge=NudgeConfig(rollouts=3))
        report["guided_nudge_rollouts"] = rolled
        report["rollout_overhead"] = seq["tok_per_s"] / rolled["tok_per_s"] - 1
        engine.close()
        engine = load_engine(True, "graph")
        report["parallel_threads"] = {
            "base": engine.base.threads,
            "arm": next(iter(engine.arms.values())).threads,
        }
        report["guided_parallel"] = _best(engine, prompt, n, repeats, guidance=True)
        if trunk != "graph":
            tapped = _tapped_engine(load_engine, trunk)
            if tapped is not None:
                engine.close()
                engine = tapped
                report["unguided_tap"] = _best(engine, prompt, n, repeats, guidance=False)
                report["guided_base_tap"] = _best(engine, prompt, n, repeats, guidance=True)
        seq = report["guided_sequential"]
        bound = 1e3 / (seq["base_ms"] + sum(seq["arm_ms"].values()))
        report["forward_bound_tok_per_s"] = bound
        best = max(report[m]["tok_per_s"] for m in GUIDED_MODES if m in report)
        report["guided_vs_bound"] = best / bound
        report["guided_vs_unguided"] = best / unguided["tok_per_s"]
        if "guided_base_tap" in report:  # the same engine, a moment apart: less exposed to drift
            report["tap_vs_unguided_tap"] = report["guided_base_tap"]["tok_per_s"] / report["unguided_tap"]["tok_per_s"]
    engine.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report["peak_rss_mb"] = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    report["disk_mb"] = disk_usage(engine)
    return report


GUIDED_MODES = ("guided_sequential", "guided_parallel", "guided_base_tap")


def _tapped_engine(load_engine, trunk: str):
    """The engine with heads on the base's own layer, or None when the bundle does not allow it
    and `trunk` is "auto" ("base" makes that an error)."""
    try:
        engine = load_engine(False, "base")
    except ConfigError:
        if trunk == "base":
            raise
        return None
    return engine


def measure_placement(bundle, prompt: str = "Write a short story about a lighthouse keeper.", n: int = 48):
    """Sequential vs overlapped for the bundle's default ARMs, one short greedy run each (pack build)."""
    import gc

    from . import memory
    from .loader import load

    report = {}
    for parallel in (False, True):
        engine = load(str(bundle), parallel=parallel, trunk="graph")
        _run(engine, prompt, 8, None, True)  # warm-up: first-run allocations
        key = "guided_parallel" if parallel else "guided_sequential"
        report[key] = _run(engine, prompt, n, None, True)
        if not parallel:
            report["unguided"] = _run(engine, prompt, n, None, False)
            report["arms"] = {k: v for k, v in engine.weights.items() if v}
        engine.close()
        del engine  # both engines at once would double the build's peak memory
        gc.collect()
        memory.trim()
    return record_placement(bundle, report)


def record_placement(bundle, report: dict) -> dict | None:
    """Write the faster of sequential and overlapped (for this set of ARMs) into the bundle's
    manifest: the loader uses it instead of its size rule (plan.LoadPlan.measured_parallel)."""
    import json
    import time
    from pathlib import Path

    from .manifest import MANIFEST, write_manifest

    if "guided_parallel" not in report:
        return None
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    seq, par = report["guided_sequential"]["tok_per_s"], report["guided_parallel"]["tok_per_s"]
    rec = {"parallel": par > seq, "sequential_tok_s": round(seq, 1), "parallel_tok_s": round(par, 1),
           "unguided_tok_s": round(report["unguided"]["tok_per_s"], 1), "measured": time.strftime("%Y-%m-%d")}  # fmt: skip
    m.setdefault("placement", {})[",".join(sorted(report["arms"]))] = rec
    write_manifest(Path(bundle), m)
    return rec


def disk_usage(engine) -> dict:
    """MB on disk: the bundle folder, and the optimized-graph cache entries of its ARM files."""
    from .backends.onnx_arm import optimized_cache_path

    root = engine.base.path.parent
    files = root.rglob("*") if (root / "manifest.json").is_file() else [engine.base.path]  # a bare .gguf
    bundle = sum(p.stat().st_size for p in files if p.is_file())
    cache = 0
    for graph in _graphs(engine):
        entry = optimized_cache_path(graph.path)
        if entry is not None:
            cache += sum(p.stat().st_size for p in entry.parent.glob(entry.name + "*") if p.is_file())
    return {"bundle": bundle / 1e6, "ort_cache": cache / 1e6}


def _graphs(engine):
    """Every ONNX session file the engine loaded (whole ARMs, or trunk + heads + LM head)."""
    seen = {}
    for unit in engine.units:
        for g in unit.graphs:
            seen[str(g.path)] = g
    return list(seen.values())


CURVE_PROMPTS = ("How was your day?", "Give me three tips for a job interview.")  # beside --prompt
STAND_IN = "{arm}_standin{j}"  # the name of a stand-in objective (objective_curve)


def stand_in_view(root: Path, count: int, into: Path) -> Path:
    """`into`: a bundle folder that is `root` (every entry linked, nothing copied) with `count`
    stand-in ARMs more: its first ARM's entry under other names. A stand-in's graph is loaded
    and run as its own head, so it costs what one more objective costs; its scores are the
    copied ARM's."""
    from .manifest import MANIFEST, read_json

    m = read_json(root / MANIFEST, "manifest")
    if not m.get("arms"):
        raise ConfigError(f"bundle '{root}' has no ARM to stand in for more objectives")
    first = next(iter(m["arms"]))
    into.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():
        if p.name != MANIFEST:
            (into / p.name).symlink_to(p.resolve())
    for j in range(count):
        m["arms"][STAND_IN.format(arm=first, j=j + 2)] = dict(m["arms"][first])
    (into / MANIFEST).write_text(json.dumps(m, indent=1))
    return into


def objective_curve(engine, prompts, n: int, repeats: int, k_max: int) -> dict:
    """Tokens/s with 1..k_max objectives on (each ARM at its default weight, 0.5 where that is 0),
    in the exact and the fast mode, against unguided: every mode once per round, rounds
    interleaved, the best round kept, each run over all of `prompts`. `ms_per_objective`: the
    per-token time each extra objective adds (least squares over k), per mode."""
    names = list(engine.arms)[:k_max]
    modes = {"unguided": ({}, False, True)}
    for k in range(1, len(names) + 1):
        w = {a: (engine.weights.get(a) or 0.5) if i < k else 0.0 for i, a in enumerate(names)}
        modes[f"{k} exact"] = (w, True, True)
        modes[f"{k} fast"] = (w, True, False)
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for m, (w, guided, exact) in modes.items():
            runs = [_run(engine, p, n, w, guided, exact=exact) for p in prompts]
            tok = sum(r["tokens"] for r in runs)
            got = {
                "tok_per_s": tok / sum(r["tokens"] / r["tok_per_s"] for r in runs),
                "guided_fraction": sum(r["tokens"] * r["guided_fraction"] for r in runs) / tok,
                "python_ms": sum(r["tokens"] * r["python_ms"] for r in runs) / tok,
            }
            if got["tok_per_s"] > best.get(m, {"tok_per_s": 0.0})["tok_per_s"]:
                best[m] = got
    ref = best["unguided"]["tok_per_s"]
    for v in best.values():
        v["vs_unguided"] = v["tok_per_s"] / ref
    slope = {}
    for mode in ("exact", "fast"):
        ks = list(range(1, len(names) + 1))
        ms = [1e3 / best[f"{k} {mode}"]["tok_per_s"] for k in ks]
        if len(ks) > 1:
            kbar, mbar = sum(ks) / len(ks), sum(ms) / len(ms)
            slope[mode] = sum((k - kbar) * (m - mbar) for k, m in zip(ks, ms)) / sum((k - kbar) ** 2 for k in ks)
    return {"objectives": names, "modes": best, "ms_per_objective": slope,
            "unguided_ms": 1e3 / ref, "tokens": n, "prompts": len(prompts)}  # fmt: skip


def format_curve(c: dict) -> str:
    lines = ["", f"cost curve: 1..{len(c['objectives'])} objectives ({', '.join(c['objectives'])}), "
             f"{c['prompts']} prompts x {c['tokens']} tokens, modes interleaved, best round"]  # fmt: skip
    lines.append(f"{'objectives':<12}{'mode':<7}{'tok/s':>8}{'vs unguided':>13}{'ms/token':>10}{'guided':>8}{'python ms':>11}")
    for m, v in c["modes"].items():
        k, _, mode = m.partition(" ")
        lines.append(f"{k if mode else '0':<12}{mode or '-':<7}{v['tok_per_s']:>8.1f}{v['vs_unguided']:>13.2f}"
                     f"{1e3 / v['tok_per_s']:>10.2f}{v['guided_fraction']:>8.0%}{v['python_ms']:>11.3f}")  # fmt: skip
    for mode, s in c["ms_per_objective"].items():
        lines.append(f"each objective adds {s:.2f} ms/token in the {mode} mode (unguided: {c['unguided_ms']:.2f})")
    return "\n".join(lines)


def format_report(r: dict) -> str:
    lines = [
        f"base {r['base']}  arms {r['arms'] or 'none'}  {r['tokens']} tokens/run  "
        f"base threads {r['base_threads']}",
        "",
    ]
    lines.append(f"{'mode':<22}{'tok/s':>8}{'base ms':>9}{'python ms':>11}  arm ms")
    modes = ("unguided", "guided_sequential", "guided_nudge", "guided_nudge_rollouts", "guided_parallel",
             "unguided_tap", "guided_base_tap")  # fmt: skip
    for mode in modes:
        if mode in r:
            s = r[mode]
            arms = " ".join(f"{k}={v:.2f}" for k, v in s["arm_ms"].items()) or "-"
            lines.append(
                f"{mode:<22}{s['tok_per_s']:>8.1f}{s['base_ms']:>9.2f}{s['python_ms']:>11.3f}  {arms}"
            )
    if "guided_nudge" in r:
        nz = r["guided_nudge"]["nudge"]
        lines.append(
            f"(guided_nudge: default tau, {nz['sites']} sites in {nz['steps']} steps = "
            f"{nz['trigger_rate']:.0%}, {nz['changed']} changed; overhead vs guided_sequential "
            f"{100 * r['nudge_overhead']:+.1f}% by tok/s, "
            f"{100 * r['nudge_overhead_python']:+.2f}% by Python-side time)"
        )
    if "guided_nudge_rollouts" in r:
        nz = r["guided_nudge_rollouts"]["nudge"]
        lines.append(
            f"(guided_nudge_rollouts: 3 candidates x 4 tokens at {nz['verified']} sites, "
            f"{nz['rollout_tokens']} extra forwards; overhead vs guided_sequential "
            f"{100 * r['rollout_overhead']:+.0f}% by tok/s)"
        )
    if "parallel_threads" in r:
        lines.append(
            f"(parallel: base {r['parallel_threads']['base']} threads, each ARM {r['parallel_threads']['arm']})"
        )
    if "forward_bound_tok_per_s" in r:
        lines += [
            "",
            f"forward bound 1/(t_base + sum t_arm): {r['forward_bound_tok_per_s']:.1f} tok/s",
            f"best guided / bound:     {r['guided_vs_bound']:.2f}",
            f"best guided / unguided:  {r['guided_vs_unguided']:.2f}",
        ]
        if "tap_vs_unguided_tap" in r:
            lines.append(
                f"guided_base_tap / unguided_tap (one engine): {r['tap_vs_unguided_tap']:.2f}  "
                "(modes interleaved: scripts/bench_tap.py)"
            )
    lines.append(f"peak RSS: {r['peak_rss_mb']:.0f} MB")
    if "disk_mb" in r:
        d = r["disk_mb"]
        lines.append(f"disk: bundle {d['bundle']:.0f} MB + optimized-graph cache {d['ort_cache']:.0f} MB")
    return "\n".join(lines)
