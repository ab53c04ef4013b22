"""kill -9 at random points of `pack build` and `export arm`, then the same command again.

A tiny pack recipe (tests/tiny_pack.py; its committed adapters build without torch, through
export/lean_pack.py) and the tiny HF ARM keep each build to seconds. For
each command: one uninterrupted build is the reference; then runs are killed (SIGKILL to the
whole process group) at random times and run again. After every kill the state on disk must
not be a bundle that loads but is wrong: a pack is only marked built when it equals the
reference, and a bundle that opens (hashes verified) lists only files equal to the
reference's. Every rerun resumes: stages finished before the kill are skipped, not redone.
The finished bundle must equal the reference file by file (sha256), its manifest too, but
for what a build measures or stamps (placement timings, source mtimes fingerprints).

The first, uninterrupted pack build is also the quiet-first-run check: at most 20 lines,
one per stage with its name; `-v` shows the rest.

20 kills in all, split across the two commands (10 each): see test_kills_then_reruns.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_genarm.bundle import Bundle
from edge_genarm.errors import EdgeGenarmError

from .corpus import link_bundle

pytest.importorskip("peft")  # the train extra: CI installs it (scripts/setup.sh)
from .tiny_pack import make_recipe  # noqa: E402

EXE = str(Path(sys.executable).with_name("edge-genarm"))
KILLS = {"pack": 10, "export": 10}  # 20 kill points in all
STAGE_LINE = re.compile(r"\[(\d+)/(\d+)\] (.+?) \.\.\. (\d+) s$")
STAGE_HEAD = re.compile(r"\[\d+/\d+\] (.+?) \.\.\.")


def _env(cache: Path, recipes: Path) -> dict:
    return {
        **os.environ,
        "EDGE_GENARM_CACHE": str(cache),
        "EDGE_GENARM_RECIPES": str(recipes),
        "EDGE_GENARM_ORT_CACHE": "0",
        "EDGE_GENARM_CONFIG": str(cache / "no-config.toml"),
    }


class Run:
    """`edge-genarm ARGS` with its output in `log`; optionally SIGKILLed (its whole process group)
    `after` seconds from the start, or `after` seconds from when `mark` appears in its output."""

    def __init__(self, args, env, log: Path, after: float | None = None, mark: str | None = None):
        self.seen: dict[str, float] = {}  # stage header -> seconds from the start when it appeared
        t0 = time.monotonic()
        with open(log, "wb") as out:
            p = subprocess.Popen(
                [EXE, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = t0 + (after if after is not None and mark is None else 900)
            while p.poll() is None:
                now = time.monotonic()
                text = log.read_text(errors="replace")
                for m in STAGE_HEAD.finditer(text):
                    self.seen.setdefault(m.group(1), now - t0)
                if mark is not None and mark in self.seen and after is not None:
                    deadline = min(deadline, t0 + self.seen[mark] + after)
                if now >= deadline:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    break
                time.sleep(0.05)
        self.rc = p.returncode if p.returncode is not None and p.returncode >= 0 else None
        assert self.rc is not None or now >= deadline, f"died by signal {p.returncode} on its own"
        self.out, self.secs = log.read_text(errors="replace"), time.monotonic() - t0

    def durations(self) -> dict[str, float]:
        """Seconds each stage took, from when its header appeared to the next one (or the end)."""
        names = list(self.seen)
        ends = [self.seen[n] for n in names[1:]] + [self.secs]
        return {n: end - self.seen[n] for n, end in zip(names, ends)}


def _run(args, env, log: Path, kill_after: float | None = None) -> tuple[int | None, str, float]:
    r = Run(args, env, log, kill_after)
    return r.rc, r.out, r.secs


def snapshot(bundle: Path) -> dict[str, str]:
    """sha256 of every file in the bundle, and its manifest less what a build measures or stamps:
    placement timings, created_by, and each source's path and fingerprint (the build folder's
    name and its files' mtimes)."""
    out = {}
    for p in sorted(bundle.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[str(p.relative_to(bundle))] = hashlib.sha256(p.read_bytes()).hexdigest()
    m = json.loads((bundle / "manifest.json").read_text())
    m.pop("placement", None)
    m.pop("created_by", None)
    for rec in [m.get("base", {}), *m.get("arms", {}).values()]:
        for key in ("fingerprint", "path"):
            rec.get("source", {}).pop(key, None)
    out["manifest.json"] = json.dumps(m, sort_keys=True)
    return out


def _diff(got: dict, want: dict) -> list[str]:
    return sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))


def opens(bundle: Path) -> bool:
    """Whether the bundle opens with every recorded hash verified (what a load would accept)."""
    if not (bundle / "manifest.json").is_file():
        return False
    try:
        Bundle.open(bundle, verify=True)
    except EdgeGenarmError:
        return False
    return True


def kill_loop(run, kills: int, budget, after_kill, compare) -> list[str]:
    """Runs killed at random times (uniform up to `budget()`, the time a run is expected to have
    left) until `kills` kills; a run that ends by itself, and the last one, must succeed and
    `compare()`. `run(kill_after)` -> (exit code or None when killed, output, seconds)."""
    rng = random.Random(kills)
    done, events = 0, []
    while True:
        t = rng.uniform(0.3, max(0.6, budget())) if done < kills else None
        rc, out, secs = run(t)
        if rc is None:
            done += 1
            events.append(f"killed at {t:.1f} s: {after_kill(out)}")
            continue
        assert rc == 0, f"the run after {done} kills failed:\n{out[-3000:]}"
        compare()
        events.append(f"ran to the end in {secs:.1f} s: identical to the uninterrupted build")
        if done >= kills:
            return events


# ---------------------------------------------------------------------------
# pack build
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack_setup(tiny_root, tmp_path_factory):
    """The tiny recipe and its uninterrupted build (quiet, as a user's first run)."""
    work = tmp_path_factory.mktemp("pack")
    recipes = work / "recipes"
    make_recipe(recipes, tiny_root)
    r = Run(["pack", "build", "tiny"], _env(work / "clean", recipes), work / "clean.log")
    assert r.rc == 0, r.out
    stages = {m.group(3): int(m.group(4)) for m in map(STAGE_LINE.search, r.out.splitlines()) if m}
    ref = snapshot(work / "clean" / "packs" / "tiny" / "bundle")
    return {"work": work, "recipes": recipes, "out": r.out, "secs": r.secs, "stages": stages, "ref": ref,
            "durations": r.durations()}  # fmt: skip


def test_first_run_is_quiet_one_line_per_stage(pack_setup):
    out = pack_setup["out"]
    lines = [line for line in out.splitlines() if line.strip()]
    print(f"{len(lines)} lines, {pack_setup['secs']:.0f} s:\n{out}")
    assert len(lines) <= 20, out
    assert list(pack_setup["stages"]) == [
        "base model",
        "ARM 'yes'",
        "ARM 'no'",
        "shared trunk",
        "placement",
    ], out
    assert lines[-1].startswith("pack 'tiny' ready at"), lines[-1]
    for noise in ("Warning", "it/s]", "Found different candidate", "Traceback", "parity"):
        assert noise not in out, noise
    log = (pack_setup["work"] / "clean" / "packs" / "tiny-build.log").read_text(errors="replace")
    # the rest is in the log: the recipe's committed adapters build without torch (export/lean_pack.py)
    assert "parity ARM 'yes'" in log and "the committed adapter adapters/yes (numpy)" in log


def test_kills_then_reruns_pack_build(pack_setup):
    """Two kills in each stage, in build order (one resumed build: each rerun goes on from where
    the last one was killed), at a random point of the stage (by its uninterrupted duration)."""
    work, ref, durations = pack_setup["work"], pack_setup["ref"], pack_setup["durations"]
    env = _env(work / "killed", pack_setup["recipes"])
    root = work / "killed" / "packs" / "tiny"
    rng = random.Random(0)
    targets = [name for name in durations for _ in range(KILLS["pack"] // len(durations))]
    targets += list(durations)[: KILLS["pack"] - len(targets)]
    finished: list[str] = []  # stages whose line was printed whole before a kill
    events, kills, queue = [], 0, [*targets, None]
    for i in range(3 * len(queue)):
        if not queue:
            break
        target = queue[0]
        before = list(finished)
        built_before = (root / "pack.json").is_file()  # a kill after the marker: the rerun only says so
        verbose = i == 3  # one rerun with -v: the tools' own output is on the terminal
        args = ["pack", "build", "tiny", *(["-v"] if verbose else [])]
        after = rng.uniform(0.02, 0.5) * max(durations.get(target, 0.0), 0.3) if target else None
        r = Run(args, env, work / f"run-{i}.log", after, mark=target)
        said = r.out if verbose else (root.parent / "tiny-build.log").read_text(errors="replace")
        passed = [m.group(3) for m in map(STAGE_LINE.search, r.out.splitlines()) if m]
        for stage, skipped, redone in [
            ("base model", "base is already exported from this source: skipping", "base: converting"),
            *[(f"ARM '{a}'", f"ARM '{a}' is already exported from this source: skipping",
               f"ARM '{a}': the base + the committed adapter") for a in ("yes", "no")],
        ]:  # fmt: skip
            if stage in before and not built_before and (r.rc == 0 or stage in passed):  # resumed: skipped
                assert skipped in said and redone not in said, f"{stage} was redone:\n{said[-2000:]}"
        if built_before:
            assert r.out.strip().startswith("pack 'tiny' ready at") or r.rc is None, r.out
        elif verbose:  # the tools' own messages are on the terminal
            assert "base is already exported from this source: skipping" in r.out, r.out[-2000:]
        else:  # one line per stage, nothing else
            other = [
                x
                for x in r.out.splitlines()
                if x.strip() and not STAGE_HEAD.search(x) and "ready at" not in x
            ]
            assert not other, other
        if r.rc is None:
            kills += 1
            queue.pop(0)
            finished.extend(n for n in passed if n not in finished)
            if (root / "pack.json").is_file():  # marked built only when whole: then it is the reference
                assert not _diff(snapshot(root / "bundle"), ref), _diff(snapshot(root / "bundle"), ref)
            state = "opens" if opens(root / "bundle") else "refused"
            events.append(
                f"killed in {target} after {after:.1f} s of it ({len(finished)} stages done; bundle {state})"
            )
            continue
        assert r.rc == 0, f"the run after {kills} kills failed:\n{r.out[-3000:]}"
        diff = _diff(snapshot(root / "bundle"), ref)
        assert (root / "pack.json").is_file() and not diff, f"the resumed build differs: {diff}"
        events.append(f"ran to the end in {r.secs:.1f} s: identical to the uninterrupted build")
        finished.clear()
        if target is None:
            queue.pop(0)
        else:  # ended before its kill point: again from scratch, for the same stage
            shutil.rmtree(root)
    print("\n".join(events))
    assert kills == KILLS["pack"] and not queue, events
    assert events[-1].startswith("ran to the end")


# ---------------------------------------------------------------------------
# export arm
# ---------------------------------------------------------------------------


def test_kills_then_reruns_export_arm(tiny_root, tmp_path):
    src, base = tiny_root / "hf" / "alpha", tiny_root / "bundle"
    env = _env(tmp_path / "cache", tmp_path / "no-recipes")

    def args(b: Path) -> list[str]:
        return ["export", "arm", str(src), "-o", str(b), "--name", "gamma", "--beta-r", "0.1"]

    clean = link_bundle(base, tmp_path / "clean")
    rc, out, secs = _run(args(clean), env, tmp_path / "clean.log")
    assert rc == 0, out
    ref, old = snapshot(clean), snapshot(base)
    bundle = tmp_path / "killed"
    state = {"n": 0}

    def run(kill_after):
        had_gamma = (bundle / "manifest.json").is_file() and "gamma" in json.loads(
            (bundle / "manifest.json").read_text()
        )["arms"]
        state["n"] += 1
        rc, out, secs = _run(args(bundle), env, tmp_path / f"run-{state['n']}.log", kill_after)
        if had_gamma and rc is not None:  # finished before the kill: the rerun only says so
            assert "ARM 'gamma' is already exported from this source: skipping" in out, out[-2000:]
        return rc, out, secs

    def after_kill(out: str) -> str:
        if not opens(bundle):
            return "refused"
        got = snapshot(bundle)
        have = "gamma" in json.loads(got["manifest.json"])["arms"]
        want = ref if have else old  # the ARM whole, or the bundle as before
        wrong = [k for k in json.loads(got["manifest.json"]).get("files", {}) if got.get(k) != want.get(k)]
        assert not wrong, f"a bundle that opens lists wrong files: {wrong}"
        return f"opens {'with' if have else 'without'} gamma, its files as the reference"

    def compare():
        diff = _diff(snapshot(bundle), ref)
        assert not diff, f"the resumed export differs from the uninterrupted one: {diff}"
        shutil.rmtree(bundle)
        link_bundle(base, bundle)

    link_bundle(base, bundle)
    events = kill_loop(run, KILLS["export"], lambda: secs, after_kill, compare)
    print("\n".join(events))
