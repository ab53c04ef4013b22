"""Malformed inputs through the real command line: a clean one-line error naming the file or
field, never a signal, a traceback or a hang (corpus.py builds the cases).

Each case runs `edge-genarm ...` in its own process, so a llama.cpp abort shows up as a
signal instead of killing the test run. Cases run two at a time, one test per class.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .corpus import Case, build_corpus

TIMEOUT = 90  # s; the slowest clean case takes a few seconds
EXE = Path(sys.executable).with_name("edge-genarm")
COMMAND = [str(EXE)]
CLASSES = [
    "gguf-truncated",
    "gguf-magic-version",
    "gguf-counts",
    "gguf-vocab",
    "gguf-bitflip",
    "gguf-chat-template",
    "gguf-hparams",
    "onnx",
    "tokens-json",
    "manifest",
    "arguments",
    "prompt-file",
]


@dataclass
class Outcome:
    case: Case
    rc: int | None  # None: timed out
    out: str
    err: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("Error:")]

    def problem(self) -> str | None:
        """Why this outcome is wrong, or None."""
        c = self.case
        if self.rc is None:
            return f"hung (killed after {TIMEOUT} s)"
        if self.rc < 0:
            return f"killed by signal {-self.rc}"
        text = self.out + self.err
        if "Traceback" in text:
            return "printed a traceback"
        if self.rc == 0:
            return None if c.may_run else "accepted (exit 0): should be refused"
        lines = self.error_lines
        if len(lines) != 1:
            return f"{len(lines)} 'Error:' lines, want 1"
        if not re.search(c.expect, lines[0], re.I):
            return f"the error does not name /{c.expect}/"
        return None


def run_case(case: Case, work: Path, env: dict) -> Outcome:
    d = work / f"{case.cls}--{case.name}"
    d.mkdir(parents=True)
    args = case.build(d)
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            [*COMMAND, *args], input=case.stdin, capture_output=True, timeout=TIMEOUT, env=env, cwd=d
        )
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or b"", e.stderr or b""
    dt = time.monotonic() - t0
    import shutil

    shutil.rmtree(d, ignore_errors=True)  # hard links and a few small files: keep the disk free
    return Outcome(case, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), dt)


def run_cases(cases: list[Case], work: Path, cache: Path, workers: int = 2) -> list[Outcome]:
    env = {
        **os.environ,
        "EDGE_GENARM_CACHE": str(cache),  # the probe's and the hashes' memos start empty
        "EDGE_GENARM_ORT_CACHE": "0",
        "EDGE_GENARM_CONFIG": str(work / "no-config.toml"),
    }
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: run_case(c, work, env), cases))


def format_outcomes(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        first = (o.error_lines or [o.err.strip().splitlines()[-1] if o.err.strip() else "(no stderr)"])[0]
        verdict = o.problem() or "ok"
        lines.append(
            f"{o.case.cls:<20} {o.case.name:<28} rc={o.rc!s:<5} {o.seconds:5.1f}s {verdict:<10} {first[:150]}"
        )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tiny_bundle) -> list[Case]:
    return build_corpus(tiny_bundle)


def test_every_class_has_cases(corpus):
    counts = Counter(c.cls for c in corpus)
    assert set(counts) == set(CLASSES), counts
    assert sum(counts.values()) >= 200 and min(counts.values()) >= 5, counts


@pytest.mark.parametrize("cls", CLASSES)
def test_malformed_inputs_end_in_one_clean_line(cls, corpus, tmp_path):
    cases = [c for c in corpus if c.cls == cls]
    outcomes = run_cases(cases, tmp_path / "work", tmp_path / "cache")
    bad = [o for o in outcomes if o.problem()]
    detail = "\n\n".join(
        f"{o.case.name}: {o.problem()}\n--- stderr ---\n{o.err[-3000:]}\n--- stdout ---\n{o.out[-500:]}"
        for o in bad
    )
    assert not bad, f"{len(bad)} of {len(cases)} cases wrong:\n{format_outcomes(bad)}\n\n{detail}"


if __name__ == "__main__":  # a report of the whole corpus: python -m tests.test_malformed BUNDLE [CLASS...]
    import tempfile

    tiny, only = Path(sys.argv[1]), set(sys.argv[2:])
    if os.environ.get("CORPUS_SRC"):  # run another checkout's code (e.g. the commit before a fix)
        COMMAND[:] = [sys.executable, "-m", "edge_genarm.cli"]
        os.environ["PYTHONPATH"] = os.environ["CORPUS_SRC"]
    cases = [c for c in build_corpus(tiny) if not only or c.cls in only]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        outcomes = run_cases(cases, Path(tmp) / "work", Path(tmp) / "cache")
        print(format_outcomes(outcomes))
        probs = Counter((o.problem() or "ok").split(" (")[0].split(":")[0] for o in outcomes)
        print(f"\n{len(outcomes)} cases in {time.monotonic() - t0:.0f} s: {dict(probs)}")
        print(dict(Counter(c.cls for c in cases)))
