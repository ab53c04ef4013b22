"""Judges: `(prompt, response) -> float`, higher is better, built from a spec string.

Built-ins: `sentiment` (VADER compound), `afinn` (AFINN-165 valence per word: a second,
independent sentiment lexicon), `length` (-word count), `tokens` (-token count, set by the
caller that knows the tokenizer), `regex:PATTERN`, `keyword:a,b,c`, and
`python:module:function` for a user's own. No torch: the runtime's `compare`, `eval` and
`batch` use them as they are.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from .errors import ConfigError
from .records import DataError

Judge = Callable[[str, str], float]




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


def make_judge(spec: str, tokenize: Callable[[str], list[int]] | None = None) -> Judge:
    """Build a judge from its spec: sentiment | afinn | length | tokens | regex:P | keyword:a,b |
    python:mod:fn. `tokens` (-token count: shorter wins, judged in the model's own tokens, not in
    words) needs `tokenize`, the base model's tokenizer."""
    kind, _, arg = spec.partition(":")
    if kind == "tokens" and not arg:
        if tokenize is None:
            raise ConfigError("judge 'tokens' needs the base model's tokenizer: load a model first")
        return lambda prompt, response: -float(len(tokenize(response)))
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
        f"unknown judge {spec!r}: use sentiment, afinn, length, tokens, regex:PATTERN, keyword:a,b,c "
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
