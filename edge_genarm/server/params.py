"""Request bodies -> engine arguments, checked field by field.

Both APIs (OpenAI, Ollama) end here: every bad value becomes an `ApiError` naming the
field, what it got and what would do, before anything is queued. Sampling fields not
given take `SamplingParams`' defaults (their one home), whatever the API's own defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from ..errors import ConfigError, ContextOverflowError, EdgeGenarmError
from ..guidance import SamplingParams
from ..nudge import NudgeConfig

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
INT_FIELDS = {f.name for f in dataclasses.fields(SamplingParams) if f.type == "int"}
NUDGE_FIELDS = tuple(f.name for f in dataclasses.fields(NudgeConfig))
GENARM_KEYS = ("weights", "guidance", "nudge", "explain", "exact")
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An HTTP error answer: status, message and the OpenAI error object's fields."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "server_error", 500: "server_error"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def openai(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


MAX_DEPTH = 32  # nesting of arrays/objects: a chat request needs 4 (body, messages, message, parts)
MAX_INT = 10**100  # past it float(x) overflows somewhere; seeds (taken mod 2**64) need less


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 saying what is wrong with it: not UTF-8, not JSON,
    nested deeper than MAX_DEPTH, an unpaired surrogate escape (\\ud800), an integer too long."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 text: send JSON") from None
    except json.JSONDecodeError as e:
        raise bad(
            f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise bad(f"the request body is nested too deeply: at most {MAX_DEPTH} levels of arrays and objects"
                  ) from None  # fmt: skip
    except ValueError as e:  # an integer of more than 4300 digits
        raise bad(f"the request body has a number this server cannot read ({str(e)[:80]})") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_name(body)}")
    check_tree(body)
    return body


def check_tree(body) -> None:
    """Walk the parsed body once (iteratively): depth, and text that UTF-8 can carry."""
    stack = [(body, 1, ())]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise bad(f"the request body is nested too deeply at '{_where(path)}': at most {MAX_DEPTH} "
                          "levels of arrays and objects", _where(path))  # fmt: skip
            for k, x in v.items() if isinstance(v, dict) else enumerate(v):
                if isinstance(k, str):
                    _check_text(k, path)
                if isinstance(x, (str, dict, list)):
                    stack.append((x, depth + 1, (*path, k)))
                elif isinstance(x, int) and not -MAX_INT <= x <= MAX_INT:
                    at = _where((*path, k))
                    raise bad(f"'{at}' is an integer of {len(str(abs(x)))} digits: no setting takes one "
                              "past 1e100 (a float would overflow)", at)  # fmt: skip


def _where(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


def _check_text(s: str, path: tuple) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        at = _where(path) or "the request body"
        raise bad(f"'{at}' holds an unpaired surrogate escape (\\u{ord(s[e.start]):04x}) at character "
                  f"{e.start}: send valid Unicode (a pair like \\ud83d\\ude00, or the character itself)",
                  _where(path) or None) from None  # fmt: skip


# ---------------------------------------------------------------------------
# single fields
# ---------------------------------------------------------------------------


def _name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)  # fmt: skip


def get_int(body: dict, key: str, lo: int | None = None, param: str | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        want = "an integer" + (f" >= {lo}" if lo is not None else "")
        raise bad(f"'{param or key}' must be {want}, got {json.dumps(v)}", param or key)
    return v


def get_number(body: dict, key: str, param: str | None = None) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(_float(v)):
        shown = json.dumps(v)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise bad(f"'{param or key}' must be a finite number, got {_name(v)} {shown}", param or key)
    return v


def _float(v) -> float:
    """float(v), inf for an integer past float64's range (JSON integers have any length)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


def get_bool(body: dict, key: str, default: bool = False, param: str | None = None) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{param or key}' must be true or false, got {_name(v)}", param or key)
    return v


def get_str(body: dict, key: str, param: str | None = None) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise bad(f"'{param or key}' must be a string, got {_name(v)}", param or key)
    return v


def get_stop(body: dict, key: str = "stop") -> list[str]:
    v = body.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > 16:
        raise bad(f"'{key}' must be a string or an array of at most 16 strings", key)
    return [s for s in v if s]


def refuse_unless(cond, message: str, param: str) -> None:
    if not cond:
        raise bad(message, param, "unsupported_parameter")


# ---------------------------------------------------------------------------
# what a request asks of the engine
# ---------------------------------------------------------------------------


@dataclass
class Spec:
    """A checked request: what to pass to `Engine.stream`, and how to answer."""

    model: str
    prompt: object  # a string, chat messages, or token ids
    raw: bool = False
    system: str | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    weights: dict[str, float] = field(default_factory=dict)
    guidance: bool = True
    nudge: NudgeConfig | None = None
    explain: bool = False
    exact: bool | None = None  # None: the default mode (fastmode.DEFAULT_EXACT)
    top_logprobs: int | None = None  # None: no log-probs
    stream: bool = False
    include_usage: bool = False
    user: str | None = None

    def stream_kwargs(self) -> dict:
        return dict(max_tokens=self.max_tokens, sampling=self.sampling, seed=self.seed, stop=self.stop,
                    weights=self.weights, guidance=self.guidance, raw=self.raw, system=self.system,
                    nudge=self.nudge, explain=self.explain, exact=self.exact)  # fmt: skip


def sampling_from(values: dict, where: str = "") -> SamplingParams:
    """SamplingParams from the given fields (types checked here, ranges by SamplingParams)."""
    kw = {}
    for k in SAMPLING_FIELDS:
        if values.get(k) is not None:
            kw[k] = get_int(values, k, 0, where + k) if k in INT_FIELDS else get_number(values, k, where + k)
    try:
        return SamplingParams(**kw)
    except ConfigError as e:
        raise bad(str(e), next((where + k for k in kw if str(e).startswith(k)), None)) from None


def seed_from(v, param: str = "seed") -> int | None:
    """Any integer is a seed (taken modulo 2**64); absent or null: a fresh random one."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{param}' must be an integer, got {_name(v)}", param)
    return v % (1 << 64)


def apply_genarm(spec: Spec, body: dict, engine, param: str = "genarm") -> None:
    """The namespaced extension: {"weights": {...}, "guidance": bool, "nudge": bool|{...}, "explain": bool,
    "exact": bool}."""
    g = body.get("genarm")
    if g is None:
        return
    if not isinstance(g, dict):
        raise bad(f"'{param}' must be an object with keys {', '.join(GENARM_KEYS)}", param)
    unknown = [k for k in g if k not in GENARM_KEYS]
    if unknown:
        raise bad(f"unknown key '{param}.{unknown[0]}': the keys are {', '.join(GENARM_KEYS)}",
                  f"{param}.{unknown[0]}")  # fmt: skip
    w = g.get("weights")
    if w is not None:
        if not isinstance(w, dict):
            raise bad(f"'{param}.weights' must be an object of ARM name -> number", f"{param}.weights")
        try:
            engine.check_weights(w)
        except ConfigError as e:
            raise bad(str(e), f"{param}.weights") from None
        spec.weights = {**spec.weights, **{k: float(v) for k, v in w.items()}}
    spec.guidance = get_bool(g, "guidance", spec.guidance, f"{param}.guidance")
    spec.explain = get_bool(g, "explain", False, f"{param}.explain")
    if g.get("exact") is not None:
        spec.exact = get_bool(g, "exact", True, f"{param}.exact")
    spec.nudge = nudge_from(g.get("nudge"), f"{param}.nudge")


def nudge_from(v, param: str) -> NudgeConfig | None:
    if v is None or v is False:
        return None
    if v is True:
        return NudgeConfig()
    if not isinstance(v, dict):
        raise bad(f"'{param}' must be true, false or an object of nudge settings", param)
    unknown = [k for k in v if k not in NUDGE_FIELDS]
    if unknown:
        raise bad(f"unknown nudge setting '{unknown[0]}': the settings are {', '.join(NUDGE_FIELDS)}",
                  f"{param}.{unknown[0]}")  # fmt: skip
    try:
        return NudgeConfig(**v)
    except (ConfigError, TypeError, ValueError, OverflowError) as e:
        raise bad(f"'{param}': {e}", param) from None


def logprobs_from(want: bool, top) -> int | None:
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS
    ):
        raise bad(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
    if top and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if want else None


def start(engine, spec: Spec, job_cls, label: str):
    """The engine's Generation for `spec`, in a Job; bad prompts and settings become 400s here."""
    job = job_cls(gen=None, label=label, top_logprobs=spec.top_logprobs, user=spec.user)
    try:
        job.gen = engine.stream(spec.prompt, on_step=job.on_step if spec.top_logprobs is not None else None,
                                **spec.stream_kwargs())  # fmt: skip
    except ContextOverflowError as e:
        raise bad(str(e), "messages", "context_length_exceeded") from None
    except EdgeGenarmError as e:
        raise bad(str(e)) from None
    return job
