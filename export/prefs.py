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

import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from edge_genarm.errors import ConfigError, EdgeGenarmError

Judge = Callable[[str, str], float]


class DataError(EdgeGenarmError):
    """A data file (prompts, pairs) has a line that cannot be used."""


# ---------------------------------------------------------------------------
# judges: spec string -> callable
# ---------------------------------------------------------------------------


def _sentiment() -> Judge:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError(
            "judge 'sentiment' needs vaderSentiment: pip install 'edge-genarm[train]'"
        ) from None
    sia = SentimentIntensityAnalyzer()
    return lambda prompt, response: float(sia.polarity_scores(response)["compound"])


def _afinn() -> Judge:
    try:
        from afinn import Afinn
    except ImportError:
        raise ConfigError("judge 'afinn' needs the afinn package: pip install 'edge-genarm[train]'") from None
    lexicon = Afinn(language="en")
    # mean valence per word, so a longer reply does not score higher for its length alone
    return lambda prompt, response: float(lexicon.score(response)) / max(1, len(response.split()))


def _regex(pattern: str, flags: int = 0) -> Judge:
    try:
        rx = re.compile(pattern, flags)
    except re.error as e:
        raise ConfigError(f"judge regex {pattern!r} does not compile ({e}): fix the pattern") from None
    return lambda prompt, response: float(len(rx.findall(response)))


def _python(target: str) -> Judge:
    mod_name, _, fn_name = target.rpartition(":")
    if not mod_name or not fn_name:
        raise ConfigError(
            f"judge 'python:{target}' must be python:MODULE:FUNCTION, e.g. python:myjudges:score"
        )
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"judge 'python:{target}' cannot be loaded ({e}): put {mod_name}.py on PYTHONPATH "
            f"and define {fn_name}(prompt, response) -> float"
        ) from None
    if not callable(fn):
        raise ConfigError(f"judge 'python:{target}' is not callable: define a function (prompt, response)")
    return fn


def make_judge(spec: str) -> Judge:
    """Build a judge from its spec: sentiment | length | regex:P | keyword:a,b | python:mod:fn."""
    kind, _, arg = spec.partition(":")
    if kind == "sentiment" and not arg:
        return _sentiment()
    if kind == "afinn" and not arg:
        return _afinn()
    if kind == "length" and not arg:
        return lambda prompt, response: -float(len(response.split()))
    if kind == "regex" and arg:
        return _regex(arg)
    if kind == "keyword" and arg.strip(", "):
        words = [w.strip() for w in arg.split(",") if w.strip()]
        return _regex(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    if kind == "python" and arg:
        return _python(arg)
    raise ConfigError(
        f"unknown judge {spec!r}: use sentiment, afinn, length, regex:PATTERN, keyword:a,b,c "
        "or python:MODULE:FUNCTION"
    )


def run_judge(judge: Judge, name: str, index: int, prompt: str, response: str) -> float:
    """judge(prompt, response) as a finite float, or a DataError naming the judge and the prompt."""
    try:
        score = float(judge(prompt, response))
    except Exception as e:
        raise DataError(
            f"judge '{name}' failed on prompt {index} ({type(e).__name__}: {e}): fix the judge, "
            "or pass --on-error skip to leave that prompt out"
        ) from e
    if score != score or score in (float("inf"), float("-inf")):
        raise DataError(
            f"judge '{name}' returned {score} on prompt {index}: a judge must return a finite number"
        )
    return score


# ---------------------------------------------------------------------------
# files: prompts in, pairs out (append-only, resumable)
# ---------------------------------------------------------------------------


def report_bad_line(msg: str, on_error: str, stats: dict) -> None:
    """Raise under --on-error stop; otherwise warn and count."""
    if on_error == "stop":
        raise DataError(msg + " (or pass --on-error skip)")
    print(f"warning: {msg}: skipped", file=sys.stderr)
    stats["bad_lines"] = stats.get("bad_lines", 0) + 1


def read_prompts(
    path: str | Path, on_error: str = "stop", stats: dict | None = None
) -> list[tuple[int, str]]:
    """[(line index, prompt)] from a JSONL file of {"prompt": "..."} lines (index from 0)."""
    stats = {} if stats is None else stats
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                report_bad_line(f"{path} line {i + 1} is not valid JSON ({e})", on_error, stats)
                continue
            p = rec.get("prompt") if isinstance(rec, dict) else None
            if not isinstance(p, str) or not p.strip():
                report_bad_line(f'{path} line {i + 1} has no non-empty "prompt" string', on_error, stats)
                continue
            out.append((i, p))
    return out


def done_prompts(out: Path) -> set[int]:
    """prompt_index of every whole line already in `out`; a torn last line is cut off."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):  # killed mid-write: drop the partial line before appending
        with open(out, "r+b") as f:
            f.truncate(len(whole))
    done = set()
    for line in whole.decode("utf-8").splitlines():
        try:
            done.add(int(json.loads(line)["prompt_index"]))
        except (ValueError, KeyError, TypeError):
            continue
    return done


def append_line(out: Path, rec: dict) -> None:
    """One os.write of a whole line with O_APPEND, then fsync: a line is all there or absent."""
    data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


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
