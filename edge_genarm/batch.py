"""`edge-genarm batch`: one JSON record per (prompt, setting, sample), resumable, the same
records wherever and however the work is split (one process, or Ray actors: distributed.py).

The reusable core (the `eval`, `compare` and `prefs` commands build on it):

- `Setting` / `parse_setting`: "unguided" | "NAME=W[,NAME=W]" with an optional "+nudge".
- `record_seed(seed, index, sample)`: the seed of one reply. It is a stable hash of the base
  seed, the prompt's index in the prompt file and the sample number j, and deliberately NOT of
  the setting: every setting of one prompt decodes with the same seed (common random numbers),
  so paired comparisons between settings cancel the sampling noise. Nothing else enters it, so
  a record does not depend on which worker made it or in what order.
- `run_record(engine, index, prompt, setting, *, seed, sample, ...)` -> one JSON-able record.
  It resets the engine's KV caches first: a reply never reuses another prompt's cached prefix,
  whose numerics differ slightly from a fresh prefill (FACTS.md), so records are identical
  under any sharding.
- `BatchWork`: the picklable description of a run (seed, k, sampling, judges as spec strings);
  `work(engine, task)` makes the record of one task. Local runs and Ray actors call the same.
- `run_batch(engine_or_factory, items, settings, out, ...)`: plan the tasks that OUT does not
  hold yet (key: prompt_index, setting, sample), run them (locally, or through a `runner`
  such as distributed.RayRunner), append each record as one whole line, show progress.

This module never imports Ray.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .guidance import SamplingParams
from .judges import make_judge, run_judge
from .nudge import NudgeConfig
from .records import append_line, done_keys

LOOP_RATIO = 0.6  # a reply whose distinct word-bigram ratio is below this is looping

# ---------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------


@dataclass
class Setting:
    """A guidance setting: a label (the record's key), ARM weights, nudging on or off."""

    label: str
    weights: dict[str, float]
    nudge: bool = False

    def as_dict(self) -> dict:
        return {"label": self.label, "weights": dict(self.weights), "nudge": self.nudge}


def parse_setting(spec: str, arms: list[str]) -> Setting:
    """ "unguided" | "NAME=W[,NAME=W]" [+nudge] over the loaded ARMs `arms` (unnamed ARMs get 0)."""
    from .bundle import parse_arm_spec

    spec = spec.strip()
    body, plus_nudge = (spec[: -len("+nudge")], True) if spec.endswith("+nudge") else (spec, False)
    weights = {a: 0.0 for a in arms}
    if body not in ("unguided", "none", ""):
        for part in body.split(","):
            name, w = parse_arm_spec(part)
            if name not in weights:
                raise ConfigError(
                    f"setting {spec!r}: unknown ARM '{name}' (loaded: {', '.join(arms) or 'none'})"
                )
            weights[name] = 1.0 if w is None else w
    return Setting(spec, weights, plus_nudge)


def weights_label(weights: dict[str, float]) -> str:
    """ "a=1,b=0.5" over the non-zero weights, "unguided" when there is none."""
    on = [f"{n}={w:g}" for n, w in weights.items() if w != 0.0]
    return ",".join(on) or "unguided"


def default_setting(weights: dict[str, float], nudge: bool = False) -> Setting:
    """The setting of a run without --setting: the loaded ARMs at their (--arm or default) weights."""
    label = weights_label(weights) + ("+nudge" if nudge else "")
    return Setting(label, dict(weights), nudge)


# ---------------------------------------------------------------------------
# one reply -> one record
# ---------------------------------------------------------------------------


def record_seed(seed: int, index: int, sample: int = 0) -> int:
    """blake2b("seed:index:sample") as a 63-bit integer: the same for every setting, stable
    across machines, Python and NumPy versions, and independent of how the work is split."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}:{int(sample)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def distinct_bigram_ratio(text: str) -> float:
    """Distinct word bigrams / word bigrams (1.0 for a reply of fewer than two words)."""
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def mean_nll(base_logprobs: list[float]) -> float | None:
    """-mean log p_base over the reply's tokens (nats/token); None for an empty reply."""
    return -sum(base_logprobs) / len(base_logprobs) if base_logprobs else None


def run_record(
    engine,
    index: int,
    prompt,
    setting: Setting,
    *,
    seed: int,
    sample: int = 0,
    max_tokens: int = 64,
    judges: dict[str, Callable[[str, str], float]] | None = None,
    nudge: NudgeConfig | None = None,
    sampling: SamplingParams | None = None,
    **gen_kw,
) -> dict:
    """Decode `prompt` under `setting` from empty KV caches with `seed` (the caller's
    record_seed) and return its record. `nudge` configures nudging when the setting has it
    (default NudgeConfig()); `gen_kw` go to engine.generate (stop, system, sampling fields).
    Judge failures raise DataError naming the judge and the prompt.

    Record: prompt_index, prompt, setting, weights, nudge_on, seed, sample, text, tokens,
    n_tokens, finish_reason, timings (Timings.summary() + total_ms), scores {judge: score},
    nudge (NudgeReport.summary() or None), distinct_bigrams, loops (ratio < 0.6), nll (mean
    -log p_base of the sampled tokens, nats/token; None for an empty reply).
    """
    engine.reset()
    c = engine.generate(
        prompt, seed=seed, max_tokens=max_tokens, weights=setting.weights,
        nudge=(nudge or NudgeConfig()) if setting.nudge else None, sampling=sampling, **gen_kw,
    )  # fmt: skip
    ratio = distinct_bigram_ratio(c.text)
    text_prompt = prompt if isinstance(prompt, str) else str(prompt)
    return {
        "prompt_index": index,
        "prompt": prompt,
        "setting": setting.label,
        "weights": dict(c.weights),
        "nudge_on": setting.nudge,
        "seed": seed,
        "sample": sample,
        "text": c.text,
        "tokens": [int(t) for t in c.tokens],
        "n_tokens": len(c.tokens),
        "finish_reason": c.finish_reason,
        "timings": {**c.timings.summary(), "total_ms": 1e3 * c.timings.total_s},
        "scores": {n: run_judge(fn, n, index, text_prompt, c.text) for n, fn in (judges or {}).items()},
        "nudge": c.nudge.summary() if c.nudge is not None else None,
        "distinct_bigrams": ratio,
        "loops": ratio < LOOP_RATIO,
        "nll": mean_nll([r.base_logprob for r in c.records]),
    }


def record_key(rec: dict) -> tuple[int, str, int]:
    """What makes a record unique in OUT: (prompt index, setting label, sample)."""
    return int(rec["prompt_index"]), str(rec["setting"]), int(rec.get("sample", 0))


# ---------------------------------------------------------------------------
# a run: tasks, work, runners
# ---------------------------------------------------------------------------


@dataclass
class BatchWork:
    """Everything but the engine that makes the records of a run: picklable (judges are spec
    strings, built per worker with that worker's tokenizer), so Ray actors get the same."""

    seed: int = 0
    k: int = 1
    max_tokens: int = 64
    judges: tuple[str, ...] = ()
    sampling: SamplingParams | None = None
    nudge: NudgeConfig | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    exact: bool | None = None  # None: the default mode (fastmode.DEFAULT_EXACT)
    _judges: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"-k must be at least 1 (samples per prompt and setting), got {self.k}")
        if self.max_tokens < 0:
            raise ConfigError(f"--max-tokens must be >= 0, got {self.max_tokens}")
        self.judges = tuple(dict.fromkeys(self.judges))  # each judge once, in order
        for spec in self.judges:  # a bad spec fails here, before any model loads
            if spec != "tokens":
                make_judge(spec)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_judges"] = None  # built again on the worker, with its engine's tokenizer
        return state

    def tasks(self, items: Iterable[tuple[int, object]], settings: list[Setting], done: set) -> list[dict]:
        """One task per (prompt, setting, sample) whose key is not in `done`, prompt-major."""
        out = []
        for index, prompt in items:
            for j in range(self.k):
                for s in settings:
                    if (index, s.label, j) not in done:
                        out.append({"index": index, "prompt": prompt, "setting": s.as_dict(), "sample": j})
        return out

    def setup(self, engine) -> None:
        tokenize = lambda s: engine.base.tokenize(s, add_bos=False, special=False)  # noqa: E731
        self._judges = {spec: make_judge(spec, tokenize=tokenize) for spec in self.judges}

    def __call__(self, engine, task: dict) -> dict:
        if self._judges is None:
            self.setup(engine)
        s = task["setting"]
        setting = Setting(s["label"], s["weights"], s["nudge"])
        i, j = task["index"], task["sample"]
        return run_record(
            engine, i, task["prompt"], setting, seed=record_seed(self.seed, i, j), sample=j,
            max_tokens=self.max_tokens, judges=self._judges, nudge=self.nudge, sampling=self.sampling,
            stop=list(self.stop), system=self.system, exact=self.exact,
        )  # fmt: skip


class Progress:
    """tqdm when it is installed, else a plain counter on stderr; `disable` shows nothing."""

    def __init__(self, total: int, desc: str, unit: str = "reply", disable: bool = False):
        self.total, self.desc, self.n, self.disable = total, desc, 0, disable
        self._bar = None
        if not disable:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif not self.disable:
            extra = "".join(f" {k}={v}" for k, v in postfix.items())
            print(f"\r{self.desc}: {self.n}/{self.total}{extra}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.disable and self.n:
            print(file=sys.stderr)


def local_runner(engine_or_factory) -> Callable:
    """run(work, tasks, on_result) in this process on one engine (loaded on first need when a
    factory is given, so a finished run loads nothing)."""

    def run(work, tasks: list[dict], on_result: Callable[[dict], None]) -> None:
        engine = engine_or_factory if hasattr(engine_or_factory, "generate") else engine_or_factory()
        for task in tasks:
            on_result(work(engine, task))

    return run


def run_batch(
    engine_or_factory,
    items: list[tuple[int, object]],
    settings: list[Setting],
    out: str | Path,
    *,
    work: BatchWork | None = None,
    runner: Callable | None = None,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """Append to `out` the record of every (prompt, setting, sample) it does not hold yet.

    `items`: [(prompt index, prompt)] (records.read_prompts). `runner(work, tasks, on_result)`
    runs the tasks (default: this process, `engine_or_factory`); each record is appended as
    one whole line the moment it arrives, so an interrupted run resumes where it stopped.
    Returns {"tasks", "already_done", "records", "seconds"}.
    """
    work = work or BatchWork()
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"settings repeat a label ({', '.join(labels)}): give each setting once")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(out, record_key)
    tasks = work.tasks(items, settings, done)
    total = len(items) * len(settings) * work.k
    stats = {"tasks": total, "already_done": total - len(tasks), "records": 0, "seconds": 0.0}
    if not tasks:
        return stats
    if hasattr(runner, "start"):
        runner.start()  # connect to a cluster before the progress bar shows
    bar = Progress(len(tasks), "batch", disable=not progress)
    t0 = time.perf_counter()

    def on_result(rec: dict) -> None:
        append_line(out, rec)
        stats["records"] += 1
        bar.update(1)
        if on_record is not None:
            on_record(rec)

    try:
        (runner or local_runner(engine_or_factory))(work, tasks, on_result)
    finally:
        bar.close()
        stats["seconds"] = time.perf_counter() - t0
    return stats
