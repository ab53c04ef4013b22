"""Settings: command line > environment > config file > built-in defaults.

The file is TOML, at $EDGE_GENARM_CONFIG or ~/.config/edge-genarm/config.toml:

    weights = "~/bundles/smollm2"
    temperature = 0.7
    [arms]
    positive = 1.0
    concise = 0.5

An environment variable EDGE_GENARM_<KEY> (e.g. EDGE_GENARM_TEMPERATURE=0.5)
overrides the file. Built-in defaults live with their code (SamplingParams,
NudgeConfig); KEYS gathers them with the load defaults into the one table the command
line reads (DEFAULTS), and this module layers the sources and names where each came from.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .errors import ConfigError
from .guidance import SamplingParams
from .nudge import NudgeConfig

_S, _N = SamplingParams(), NudgeConfig()
# key -> (type, built-in default)
KEYS: dict[str, tuple[type, object]] = {
    "weights": (str, None),
    "arms": (dict, {}),
    "system": (str, None),
    "temperature": (float, _S.temperature),
    "top_k": (int, _S.top_k),
    "top_p": (float, _S.top_p),
    "min_p": (float, _S.min_p),
    "repeat_penalty": (float, _S.repeat_penalty),
    "repeat_last_n": (int, _S.repeat_last_n),
    "dry_multiplier": (float, _S.dry_multiplier),
    "max_tokens": (int, 256),
    "seed": (int, None),
    "ctx": (int, 4096),
    "threads": (int, None),
    "gpu_layers": (int, 0),
    "arm_device": (str, "cpu"),
    "arm_threads": (int, None),
    "trunk": (str, "auto"),
    "nudge": (bool, False),
    "nudge_tau": (float, _N.tau),
    "nudge_gap": (int, _N.min_gap),
    "nudge_k": (int, _N.top_k),
    "nudge_mode": (str, _N.mode),
    "nudge_strength": (float, _N.strength),
    "nudge_rollouts": (int, _N.rollouts),
    "nudge_rollout_len": (int, _N.rollout_len),
}
DEFAULTS: dict[str, object] = {k: d for k, (_, d) in KEYS.items()}  # the CLI's option defaults
ENV_PREFIX = "EDGE_GENARM_"


# EDGE_GENARM_* variables that steer where things live, not the effective settings
NOT_SETTINGS = {
    "EDGE_GENARM_CONFIG",
    "EDGE_GENARM_CACHE",
    "EDGE_GENARM_LLAMA_SRC",
    "EDGE_GENARM_CMAKE_ARGS",
    "EDGE_GENARM_RECIPES",
    "EDGE_GENARM_ORT_CACHE",
    "EDGE_GENARM_ORIGINS",  # the server's extra allowed origins (server/gate.py)
    "EDGE_GENARM_REQUIRE_BROWSER",  # the tests: the browser test may not skip (.ci/run)
}


def config_path() -> Path:
    env = os.environ.get("EDGE_GENARM_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "edge-genarm" / "config.toml"


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown setting '{key}' in {where}{hint}; known: {', '.join(KEYS)}")


def _coerce(key: str, value, where: str):
    typ = KEYS[key][0]
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' in {where} must be a table of NAME = WEIGHT")
        return {str(k): _coerce_number(f"arms.{k}", v, where) for k, v in value.items()}
    if typ is bool:
        if isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"'{key}' in {where} must be true or false, got {value!r}")
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"'{key}' in {where} must be {typ.__name__}, got {value!r}") from None


def _coerce_number(key, v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"'{key}' in {where} must be a number, got {v!r}")
    return float(v)


def read_file(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None
    out = {}
    for key, value in data.items():
        if key not in KEYS:
            raise _unknown(key, f"config file '{path}'")
        out[key] = _coerce(key, value, f"config file '{path}'")
    return out


def effective(environ=None, path: Path | None = None) -> dict[str, tuple[object, str]]:
    """key -> (value, source) with source one of: default, file PATH, env VAR."""
    environ = os.environ if environ is None else environ
    result = {k: (d, "default") for k, (_, d) in KEYS.items()}
    path = path or config_path()
    if path.is_file():
        for k, v in read_file(path).items():
            result[k] = (v, f"file {path}")
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var in NOT_SETTINGS:
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key not in KEYS:
            raise _unknown(key, f"environment variable {var}")
        if KEYS[key][0] is dict:
            value = dict(_parse_arm_list(raw, var))
        else:
            value = _coerce(key, raw, f"environment variable {var}")
        result[key] = (value, f"env {var}")
    return result


def _parse_arm_list(raw: str, var: str):
    from .bundle import parse_arm_spec

    for spec in filter(None, (s.strip() for s in raw.split(","))):
        name, w = parse_arm_spec(spec)
        yield name, 1.0 if w is None else w


def default_map(settings: dict[str, tuple[object, str]]) -> dict:
    """click default_map for the commands that take these options (only non-defaults)."""
    opts = {}
    for k, (v, src) in settings.items():
        if src != "default":
            opts[k] = [f"{n}={w}" for n, w in v.items()] if k == "arms" else v
    return {cmd: dict(opts) for cmd in ("generate", "chat", "bench", "calibrate-tau", "serve")}
