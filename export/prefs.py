"""Preference pairs from local judges: sample k responses per prompt, keep best vs worst.

A judge is any callable `(prompt, response) -> float` (higher is better). Built-ins:
`sentiment` (VADER compound), `afinn` (AFINN-165 valence per word: a second, independent
sentiment lexicon for evaluation), `length` (-word count: shorter wins), `regex:PATTERN`
(match count), `keyword:a,b,c` (keyword hits, case-insensitive), and
`python:module:function` for a user's own. The output JSONL gets one line per
prompt, appended and fsynced as a single write, so a re-run resumes after the
last whole line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from edge_genarm.errors import ConfigError
from edge_genarm.judges import Judge, make_judge, run_judge  # noqa: F401 (re-exported)
from edge_genarm.records import DataError, append_line, done_prompts, read_prompts, report_bad_line  # noqa: F401

# ---------------------------------------------------------------------------
# sampling and pairing
# ---------------------------------------------------------------------------


def pick_pair(responses: list[str], scores: list[float]) -> tuple[int, int] | None:
    """(best, worst) indices; None on a tie (equal scores or identical texts)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if scores[best] == scores[worst] or responses[best] == responses[worst]:
        return None
    return best, worst


def sample_responses(engine, prompt: str, index: int, k: int, seed: int, **gen) -> list[tuple[str, str]]:
    """k unguided (text, finish_reason) samples; seeds depend only on (seed, prompt index, j),
    and each sample starts from empty KV caches, so the samples do not depend on what ran before."""
    outs = []
    for j in range(k):
        engine.reset()
        outs.append(engine.generate(prompt, seed=seed * 1_000_003 + index * 101 + j, guidance=False, **gen))
    return [(o.text, o.finish_reason) for o in outs]


@dataclass
class PairWork:
    """One prompt -> its pair (or why none): the same object runs locally and on Ray actors
    (distributed.py). `judge` is built from `judge_name` on each worker when not given (a
    callable does not travel: it is dropped when pickled)."""

    judge_name: str
    k: int = 2
    seed: int = 0
    max_tokens: int = 64
    temperature: float = 1.0
    on_error: str = "skip"
    require_finished: bool = False
    judge: Judge | None = None

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ConfigError(f"-k must be at least 2 to make a pair, got {self.k}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "judge": None}

    def setup(self, engine) -> None:
        if self.judge is None:
            tokenize = lambda s: engine.base.tokenize(s, add_bos=False, special=False)  # noqa: E731
            self.judge = make_judge(self.judge_name, tokenize=tokenize)

    def __call__(self, engine, task: dict) -> dict:
        """{"prompt_index", "outcome": pair | tie | judge_error | unfinished, "empty", "pair",
        "warning"}; a judge error under on_error="stop" raises DataError."""
        self.setup(engine)
        i, prompt = task["index"], task["prompt"]
        gen = dict(max_tokens=self.max_tokens, temperature=self.temperature)
        samples = [
            (t, why) for t, why in sample_responses(engine, prompt, i, self.k, self.seed, **gen) if t.strip()
        ]
        texts = [t for t, _ in samples]
        res = {
            "prompt_index": i,
            "outcome": "tie",
            "empty": self.k - len(texts),
            "pair": None,
            "warning": None,
        }
        try:
            scores = [run_judge(self.judge, self.judge_name, i, prompt, t) for t in texts]
        except DataError as e:
            if self.on_error == "stop":
                raise
            return {**res, "outcome": "judge_error", "warning": f"warning: {e}: skipped"}
        pair = pick_pair(texts, scores) if len(texts) >= 2 else None
        if pair is None:
            return res
        w, lo = pair
        if self.require_finished and samples[w][1] == "length":
            return {**res, "outcome": "unfinished"}  # the winner was cut: it teaches no stop
        rec = {
            "prompt": prompt,
            "chosen": texts[w],
            "rejected": texts[lo],
            "scores": {"chosen": scores[w], "rejected": scores[lo]},
            # "length": cut at max_tokens, so training appends no EOS to it
            "finish": {"chosen": samples[w][1], "rejected": samples[lo][1]},
            "judge": self.judge_name,
            "prompt_index": i,
        }
        return {**res, "outcome": "pair", "pair": rec}


def make_pairs(
    engine,
    prompts: list[tuple[int, str]],
    judge: Judge | None,
    judge_name: str,
    out: str | Path,
    k: int = 2,
    seed: int = 0,
    max_tokens: int = 64,
    temperature: float = 1.0,
    on_error: str = "skip",
    progress: bool = True,
    require_finished: bool = False,
    runner=None,
) -> dict:
    """Append {prompt, chosen, rejected, scores, ...} lines to `out`; skip prompts already there.

    `runner(work, tasks, on_result)` runs the prompts elsewhere (distributed.RayRunner; then
    `engine` may be None and `judge` None, built on each worker from `judge_name`)."""
    from edge_genarm.batch import Progress, local_runner

    work = PairWork(judge_name, k, seed, max_tokens, temperature, on_error, require_finished, judge)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_prompts(out)
    tasks = [{"index": i, "prompt": p} for i, p in prompts if i not in done]
    stats = {"prompts": len(prompts), "already_done": len(prompts) - len(tasks), "pairs": 0}
    stats.update(ties=0, judge_errors=0, empty_responses=0)
    if not tasks:
        return stats
    bar = Progress(len(tasks), "prefs", unit="prompt", disable=not progress)
    names = {"pair": "pairs", "tie": "ties", "judge_error": "judge_errors", "unfinished": "unfinished"}

    def on_result(res: dict) -> None:
        if res["pair"] is not None:
            append_line(out, res["pair"])
        stats["empty_responses"] += res["empty"]
        key = names[res["outcome"]]
        stats[key] = stats.get(key, 0) + 1
        if res["warning"]:
            print(res["warning"], file=sys.stderr)
        bar.update(1, pairs=stats["pairs"], ties=stats["ties"], errors=stats["judge_errors"])

    try:
        (runner or local_runner(engine))(work, tasks, on_result)
    finally:
        bar.close()
    return stats
