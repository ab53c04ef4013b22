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
    """k unguided (text, finish_reason) samples; seeds depend only on (seed, prompt index, j)."""
    outs = [
        engine.generate(prompt, seed=seed * 1_000_003 + index * 101 + j, guidance=False, **gen)
        for j in range(k)
    ]
    return [(o.text, o.finish_reason) for o in outs]


def make_pairs(
    engine,
    prompts: list[tuple[int, str]],
    judge: Judge,
    judge_name: str,
    out: str | Path,
    k: int = 2,
    seed: int = 0,
    max_tokens: int = 64,
    temperature: float = 1.0,
    on_error: str = "skip",
    progress: bool = True,
    require_finished: bool = False,
) -> dict:
    """Append {prompt, chosen, rejected, scores, ...} lines to `out`; skip prompts already there."""
    if k < 2:
        raise ConfigError(f"-k must be at least 2 to make a pair, got {k}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_prompts(out)
    todo = [(i, p) for i, p in prompts if i not in done]
    stats = {"prompts": len(prompts), "already_done": len(prompts) - len(todo), "pairs": 0}
    stats.update(ties=0, judge_errors=0, empty_responses=0)
    for i, prompt in _bar(todo, progress, stats):
        samples = [
            (t, why)
            for t, why in sample_responses(
                engine, prompt, i, k, seed, max_tokens=max_tokens, temperature=temperature
            )
            if t.strip()
        ]
        texts = [t for t, _ in samples]
        stats["empty_responses"] += k - len(texts)
        try:
            scores = [run_judge(judge, judge_name, i, prompt, t) for t in texts]
        except DataError:
            if on_error == "stop":
                raise
            stats["judge_errors"] += 1
            print(f"warning: {sys.exc_info()[1]}: skipped", file=sys.stderr)
            continue
        pair = pick_pair(texts, scores) if len(texts) >= 2 else None
        if pair is None:
            stats["ties"] += 1
            continue
        w, lo = pair
        if require_finished and samples[w][1] == "length":
            stats["unfinished"] = stats.get("unfinished", 0) + 1  # the winner was cut: it teaches no stop
            continue
        append_line(
            out,
            {
                "prompt": prompt,
                "chosen": texts[w],
                "rejected": texts[lo],
                "scores": {"chosen": scores[w], "rejected": scores[lo]},
                # "length": cut at max_tokens, so training appends no EOS to it
                "finish": {"chosen": samples[w][1], "rejected": samples[lo][1]},
                "judge": judge_name,
                "prompt_index": i,
            },
        )
        stats["pairs"] += 1
    return stats


def _bar(items, progress: bool, stats: dict):
    from tqdm import tqdm

    bar = tqdm(items, desc="prefs", unit="prompt", file=sys.stderr, disable=not progress)
    for item in bar:
        yield item
        bar.set_postfix(pairs=stats["pairs"], ties=stats["ties"], errors=stats["judge_errors"])
