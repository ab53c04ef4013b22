"""`edge-genarm eval`: decoding methods on the same held-out prompts and seeds, judged.

Methods (one `--method` each, or a `--grid`):

    unguided                   the base alone
    NAME=W[,NAME=W]            GenARM with those ARM weights (the others at 0)
    ...+nudge / nudge          with entropy-triggered nudging (`nudge`: the nudge table alone)
    bon:N[:SCORER]             Best-of-N: N unguided samples, the best by a trajectory reward
                               (an ARM's summed log-prob, or `rm`, the bundle's reward model),
                               each scored in one prefill
    args:K[:W]                 ARGS-K: the base's top-K candidates rescored each step by the
                               reward model on the partial reply (weight W, default 1)
    SPEC@KEY=V[,KEY=V]         any of the above with sampling settings changed, e.g.
                               `positive=1@dry_multiplier=0` (SamplingParams field names)

Every method decodes every prompt with the same seed (`batch.record_seed`, as `batch` does). Each reply gets: every
judge's score, the distinct-bigram ratio of its words (a reply below 0.6 "loops"), its mean
NLL under the base (nats/token, from the base's own log-probs of the sampled tokens), its
length in tokens and whether it finished, its seconds, and its model forwards: positions any
model evaluated beyond the prompt (GenARM: 1 + active ARMs per token; Best-of-N: every
sample's tokens and their scoring; ARGS-k: 1 + k reward-model steps per token). The report holds per method the mean and standard error of each judge and
the paired difference from the first method with its standard error (same prompt, same seed:
prompt-to-prompt variation cancels), the loop rate, NLL, tokens, finish rate, tok/s and
forwards per generated token; two plots (judged gain vs tok/s, and the two-objective front of
a weight grid) are written as PNG next to report.md.

A GenARM method runs in the exact mode (every ARM at every step, the reference) unless it says
`@exact=0`, whatever the runtime's default mode: the tables made with it stay reproducible, and
the fast mode is measured against it by name.

Records are appended to OUT/records.jsonl one whole line at a time; a rerun with the same
settings skips what is there (resume), and refuses a folder made with other settings.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .batch import LOOP_RATIO, Progress, distinct_bigram_ratio, mean_nll
from .batch import record_seed as seed_for
from .errors import ConfigError, EdgeGenarmError
from .guidance import DRY_AUTO_RULE
from .judges import make_judge, run_judge
from .nudge import NudgeConfig
from .paths import atomic_write_json
from .records import DataError, append_line, whole_records
from .report import format_table, pareto, write_report  # noqa: F401  (pareto, format_table: the report's API)


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # unguided | genarm | bon | args
    weights: dict = field(default_factory=dict)  # ARM name -> weight (every loaded ARM)
    nudge: bool = False
    n: int = 0  # bon: samples; args: candidates
    scorer: str | None = None  # bon: ARM name or "rm"
    w: float = 1.0  # args: reward weight
    sampling: dict = field(default_factory=dict)  # SamplingParams fields this method changes


# ---------------------------------------------------------------------------
# methods: spec strings -> Method
# ---------------------------------------------------------------------------


def parse_method(spec: str, arms: list[str], has_nudges: bool = False, has_rm: bool = False) -> Method:
    """One method from its spec (see the module docstring); errors name the fix."""
    spec = spec.strip()
    if "@" in spec:
        body, _, over = spec.partition("@")
        m = parse_method(body, arms, has_nudges, has_rm)
        return replace(m, label=spec, sampling=parse_sampling(over, spec))
    zero = {a: 0.0 for a in arms}
    kind, _, rest = spec.partition(":")
    if kind in ("bon", "args"):
        parts = rest.split(":") if rest else []
        try:
            n = int(parts[0])
        except (IndexError, ValueError):
            raise ConfigError(f"method {spec!r}: write {kind}:N with N an integer, e.g. {kind}:4") from None
        if n < 1 or (kind == "bon" and n < 2):
            raise ConfigError(f"method {spec!r}: N must be at least {2 if kind == 'bon' else 1}")
        if kind == "bon":
            scorer = parts[1] if len(parts) > 1 else (arms[0] if arms else "rm")
            if scorer == "rm" and not has_rm:
                raise ConfigError(f"method {spec!r}: the bundle has no reward model: train one with `edge-genarm train-rm`")
            if scorer != "rm" and scorer not in arms:
                raise ConfigError(
                    f"method {spec!r}: unknown scorer '{scorer}': use an ARM of the bundle "
                    f"({', '.join(arms) or 'none loaded'}) or rm"
                )
            return Method(spec, "bon", zero, n=n, scorer=scorer)
        if not has_rm:
            raise ConfigError(
                f"method {spec!r}: ARGS scores candidates with a reward model and the bundle has none: "
                "train one with `edge-genarm train-rm`"
            )
        w = _number(parts[1], spec) if len(parts) > 1 else 1.0
        return Method(spec, "args", zero, n=n, scorer="rm", w=w)
    if ":" in spec:
        raise ConfigError(
            f"unknown method {spec!r}: use unguided, nudge, NAME=W[,NAME=W][+nudge], bon:N[:SCORER] or args:K[:W]"
        )
    body, nudge = (spec[: -len("+nudge")], True) if spec.endswith("+nudge") else (spec, False)
    if body == "nudge":
        body, nudge = "unguided", True
    if nudge and not has_nudges and not arms:
        raise ConfigError(f"method {spec!r}: the bundle has no nudge table: `edge-genarm export nudges`")
    if body in ("unguided", ""):
        return Method(spec, "unguided", zero, nudge=nudge)
    weights = dict(zero)
    for part in body.split(","):
        name, eq, val = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ConfigError(
                f"unknown method {spec!r}: use unguided, nudge, NAME=W[,NAME=W][+nudge], bon:N[:SCORER] or args:K[:W]"
            )
        if name not in zero:
            raise ConfigError(f"method {spec!r}: the bundle has no ARM '{name}' (it has: {', '.join(arms) or 'none'})")
        weights[name] = _number(val, spec)
    kind = "genarm" if any(weights.values()) else "unguided"
    return Method(spec, kind, weights, nudge=nudge)


def parse_sampling(text: str, where: str) -> dict:
    """`KEY=V[,KEY=V]` over SamplingParams fields, checked by SamplingParams itself, and `exact`
    (1: every ARM at every step, 0: the fast mode, fastmode.py)."""
    from .guidance import SamplingParams

    names = {f.name: f for f in fields(SamplingParams)}
    out = {}
    for part in text.split(","):
        key, eq, val = part.partition("=")
        key = key.strip()
        if key == "exact" and val.strip() in ("0", "1"):
            out["exact"] = val.strip() == "1"
            continue
        if not eq or key not in names:
            raise ConfigError(
                f"method {where!r}: {part!r} is not a sampling setting: use KEY=V with KEY one of "
                f"{', '.join(names)}, or exact=0|1"
            )
        num = _number(val, where)
        out[key] = int(num) if names[key].type in ("int", int) and num == int(num) else num
    SamplingParams(**{k: v for k, v in out.items() if k != "exact"})  # a bad value is refused with its own message
    return out


def expand_grid(grid: list[str], arms: list[str], nudge: bool = False,
                defaults: dict[str, float] | None = None) -> list[Method]:  # fmt: skip
    """The multi-objective grid as GenARM methods. Two forms:

    - `NAME=w1,w2,...` per ARM: one method per combination;
    - `A:B`: the 11-point front between two objectives, weights (a s, (1 - a) s) for
      a = 0, 0.1, ..., 1, where s = the two ARMs' default weights summed (their default
      strength; 1 when both default to 0), so a = the default split is the default method.
    """
    out: list[Method] = []
    axes = []
    for g in grid:
        if "=" not in g and ":" in g:
            out += _simplex(g, arms, nudge, defaults or {})
            continue
        name, eq, vals = g.partition("=")
        name = name.strip()
        if not eq or not vals.strip():
            raise ConfigError(f"grid {g!r}: write NAME=W1,W2,..., e.g. positive=0,0.5,1, or A:B for the front")
        if name not in arms:
            raise ConfigError(f"grid {g!r}: the bundle has no ARM '{name}' (it has: {', '.join(arms) or 'none'})")
        if any(name == a for a, _ in axes):
            raise ConfigError(f"grid {g!r}: ARM '{name}' is given twice: one --grid per ARM")
        axes.append((name, [_number(v, g) for v in vals.split(",")]))
    if axes:
        for combo in itertools.product(*[vals for _, vals in axes]):
            out.append(_genarm(",".join(f"{a}={_fmt(w)}" for (a, _), w in zip(axes, combo)), arms, nudge))
    return list({m.label: m for m in out}.values())


GRID_POINTS = 11  # a = 0, 0.1, ..., 1


def _simplex(g: str, arms: list[str], nudge: bool, defaults: dict[str, float]) -> list[Method]:
    a_name, _, b_name = (x.strip() for x in g.partition(":"))
    for name in (a_name, b_name):
        if name not in arms:
            raise ConfigError(f"grid {g!r}: the bundle has no ARM '{name}' (it has: {', '.join(arms) or 'none'})")
    if a_name == b_name:
        raise ConfigError(f"grid {g!r}: name two different ARMs, e.g. positive:concise")
    s = abs(defaults.get(a_name, 0.0)) + abs(defaults.get(b_name, 0.0)) or 1.0
    out = []
    for k in range(GRID_POINTS):
        a = k / (GRID_POINTS - 1)
        out.append(_genarm(f"{a_name}={_fmt(round(a * s, 6))},{b_name}={_fmt(round((1 - a) * s, 6))}", arms, nudge))
    return out


def _genarm(body: str, arms: list[str], nudge: bool) -> Method:
    m = parse_method(body + ("+nudge" if nudge else ""), arms, True)
    return Method(m.label, m.kind, m.weights, m.nudge)


def _number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{where!r}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where!r}: weights must be finite, got {text!r}")
    return v


def _fmt(w: float) -> str:
    return f"{w:g}"


# ---------------------------------------------------------------------------
# one reply -> one record
# ---------------------------------------------------------------------------


def run_method(engine, m: Method, prompt: str, seed: int, max_tokens: int, rm=None) -> dict:
    """Decode one prompt with method m: text, tokens, finish, base log-probs, seconds, forwards."""
    t0 = time.perf_counter()
    if m.kind in ("unguided", "genarm"):
        c = engine.generate(
            prompt, seed=seed, max_tokens=max_tokens, weights=m.weights, guidance=m.kind == "genarm",
            nudge=NudgeConfig() if m.nudge else None, **{"exact": True, **m.sampling},
        )  # fmt: skip
        n_active = sum(1 for w in m.weights.values() if w) if m.kind == "genarm" else 0
        forwards = (1 + n_active) * len(c.tokens)
        lp = [r.base_logprob for r in c.records]
        out = dict(text=c.text, tokens=c.tokens, finish=c.finish_reason, base_logprobs=lp, forwards=forwards)
    elif m.kind == "bon":
        from .baselines import best_of_n

        r = best_of_n(engine, prompt, m.n, seed, m.scorer if m.scorer != "rm" else rm, max_tokens=max_tokens)
        out = _from_baseline(r)
    elif m.kind == "args":
        from .baselines import args_decode

        r = args_decode(engine, prompt, rm, m.n, m.w, seed, max_tokens)
        out = _from_baseline(r)
    else:  # pragma: no cover - parse_method makes only the kinds above
        raise ConfigError(f"unknown method kind {m.kind!r}")
    out["seconds"] = time.perf_counter() - t0
    return out


def _from_baseline(r) -> dict:
    """A BestOfN / ArgsResult (baselines.py) as run_method's dict: base log-probs of the reply's
    tokens (the winning sample's records; ARGS: each pick's log p_base), forwards = positions
    the base and the scorer evaluated beyond the prompt."""
    if hasattr(r, "samples"):  # Best-of-N
        lp = [x.base_logprob for x in r.samples[r.index].records]
    else:  # ARGS
        lp = [float(st.base_logprobs[list(st.candidates).index(st.token)]) for st in r.steps]
        lp = lp[: len(r.tokens)]
    c = r.compute
    return dict(
        text=r.text, tokens=list(r.tokens), finish=r.finish_reason, base_logprobs=lp,
        forwards=int(c.base_tokens - c.base_prompt_tokens + c.scorer_tokens - c.scorer_prompt_tokens),
    )  # fmt: skip


def make_record(index: int, prompt: str, m: Method, seed: int, out: dict, judges: dict) -> dict:
    n = len(out["tokens"])
    ratio = distinct_bigram_ratio(out["text"])
    lp = out["base_logprobs"]
    return {
        "prompt_index": index,
        "method": m.label,
        "seed": seed,
        "text": out["text"],
        "n_tokens": n,
        "finished": out["finish"] == "stop",
        "scores": {name: run_judge(fn, name, index, prompt, out["text"]) for name, fn in judges.items()},
        "distinct_bigrams": ratio,
        "loops": ratio < LOOP_RATIO,
        "nll": mean_nll(lp) or 0.0,
        "seconds": out["seconds"],
        "forwards": out["forwards"],
    }


# ---------------------------------------------------------------------------
# the run: resumable records, then the summary
# ---------------------------------------------------------------------------


@dataclass
class EvalConfig:
    weights: str
    prompts: str
    skip: int
    n_prompts: int
    methods: list[str]
    judges: list[str]
    max_tokens: int
    seed: int
    dry_auto: str = DRY_AUTO_RULE  # what "auto" DRY meant for the records (resume checks it)


def check_folder(out: Path, cfg: EvalConfig) -> None:
    """A folder holds one evaluation: the same settings resume it, others are refused."""
    out.mkdir(parents=True, exist_ok=True)
    f = out / "eval.json"
    want = asdict(cfg)
    if f.is_file():
        try:
            have = json.loads(f.read_text())
        except ValueError:
            have = None
        keys = ("weights", "prompts", "skip", "max_tokens", "seed")
        if not isinstance(have, dict) or any(have.get(k) != want[k] for k in keys):
            raise ConfigError(
                f"{out} holds an evaluation made with other settings ({f}): use another -o folder, "
                "or delete it to start again"
            )
        touched = [m for m in _labels(out / "records.jsonl") if _auto_dry_label(m)]
        if have.get("dry_auto", "0.8") != want["dry_auto"] and touched:  # before the rule was recorded: 0.8
            raise ConfigError(
                f"{out} holds records made when DRY 'auto' was {have.get('dry_auto', '0.8')} (now "
                f"{want['dry_auto']}): its records of {', '.join(touched[:3])} would mix the two; use "
                "another -o folder, or delete it to start again"
            )
        want["methods"] = list(dict.fromkeys([*have.get("methods", []), *cfg.methods]))
        want["judges"] = list(dict.fromkeys([*have.get("judges", []), *cfg.judges]))
    atomic_write_json(f, want)


def _labels(path: Path) -> list[str]:
    return list(dict.fromkeys(str(r.get("method")) for r in whole_records(path))) if path.is_file() else []


def _auto_dry_label(label: str) -> bool:
    """Whether a method's records depend on what DRY "auto" means: steered (ARMs or nudging)
    with no explicit dry_multiplier. unguided, bon and args sample without DRY."""
    body, _, over = label.partition("@")
    return body != "unguided" and body.split(":")[0] not in ("bon", "args") and "dry_multiplier" not in over


def run_eval(engine, items, methods, judges: dict, out: Path, max_tokens: int, seed: int,
             rm=None, progress: bool = True) -> list[dict]:  # fmt: skip
    """Decode every (prompt, method) not yet in OUT/records.jsonl; return every record."""
    path = out / "records.jsonl"
    done = {(r.get("prompt_index"), r.get("method")) for r in whole_records(path)}
    todo = [(i, p, m) for m in methods for i, p in items if (i, m.label) not in done]
    bar = Progress(len(todo), "eval", disable=not progress)
    for i, p, m in todo:
        s = seed_for(seed, i)
        if hasattr(engine, "reset"):
            engine.reset()  # no prefix reuse across prompts: a record does not depend on the order
        rec = make_record(i, p, m, s, run_method(engine, m, p, s, max_tokens, rm), judges)
        append_line(path, rec)
        bar.update(method=m.label)
    bar.close()
    wanted = {m.label for m in methods}
    prompts = dict(items)
    out_recs = [r for r in whole_records(path) if r.get("method") in wanted and r.get("prompt_index") in prompts]
    for r in out_recs:  # a judge added on a rerun scores the replies already there (cheap, not stored)
        for name, fn in judges.items():
            if name not in r["scores"]:
                r["scores"][name] = run_judge(fn, name, r["prompt_index"], prompts[r["prompt_index"]], r["text"])
    return out_recs


# A reply a sentiment judge calls positive: VADER's compound >= 0.05 (its authors' threshold),
# AFINN's per-word mean > 0.
POSITIVE_FROM = {"sentiment": 0.05, "afinn": 1e-12}


def summarize(records: list[dict], methods: list[Method], judges: list[str]) -> list[dict]:
    """Per method: judge means (± s.e.), paired differences from the first method, loop rate,
    NLL, tokens, finish rate, tok/s and forwards per generated token."""
    by = {m.label: {r["prompt_index"]: r for r in records if r["method"] == m.label} for m in methods}
    base = by[methods[0].label] if methods else {}
    rows = []
    for m in methods:
        rs = by[m.label]
        v = list(rs.values())
        if not v:
            continue
        tokens = sum(r["n_tokens"] for r in v)
        row = {
            "method": m.label,
            "kind": m.kind,
            "weights": {a: w for a, w in m.weights.items() if w},
            "n": len(v),
            "loop_rate": sum(r["loops"] for r in v) / len(v),
            # under two words: the bigram ratio cannot see a reply of blank lines or one token repeated
            "blank_rate": sum(len(r.get("text", "").split()) < 2 for r in v) / len(v),
            "nll": mean_sem([r["nll"] for r in v]),
            "gen_tokens": mean_sem([r["n_tokens"] for r in v]),  # not "tokens": a judge has that name
            "finish_rate": sum(r["finished"] for r in v) / len(v),
            "tok_per_s": tokens / max(1e-9, sum(r["seconds"] for r in v)),
            "forwards_per_token": sum(r["forwards"] for r in v) / max(1, tokens),
        }
        for j in judges:
            row[j] = mean_sem([r["scores"][j] for r in v])
            common = [i for i in rs if i in base]
            if m is not methods[0] and common:
                row[f"{j}_diff"] = mean_sem([rs[i]["scores"][j] - base[i]["scores"][j] for i in common])
            if j in POSITIVE_FROM:  # the share of replies the judge calls positive, paired like the means
                pos = POSITIVE_FROM[j]
                row[f"{j}_positive"] = sum(r["scores"][j] >= pos for r in v) / len(v)
                if m is not methods[0] and common:
                    row[f"{j}_positive_diff"] = mean_sem(
                        [float(rs[i]["scores"][j] >= pos) - float(base[i]["scores"][j] >= pos) for i in common]
                    )
        rows.append(row)
    return rows


def mean_sem(v: list[float]) -> tuple[float, float]:
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))


def evaluate(engine, cfg: EvalConfig, items, methods: list[Method], out: Path, command: str,
             rm=None, progress: bool = True) -> tuple[list[dict], Path]:  # fmt: skip
    """The whole command: check the folder, decode what is missing, summarize, report."""
    if not items:
        raise DataError(f"{cfg.prompts}: no prompts to evaluate (lower --skip or check the file)")
    if not methods:
        raise ConfigError("no methods to evaluate: give --method or --grid")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"a method is given twice: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    judges = {}
    for j in cfg.judges:
        judges[j] = make_judge(j, tokenize=lambda s: engine.base.tokenize(s, add_bos=False, special=False))
    check_folder(out, cfg)
    try:
        records = run_eval(engine, items, methods, judges, out, cfg.max_tokens, cfg.seed, rm, progress)
    except KeyboardInterrupt:
        raise EdgeGenarmError(f"interrupted: {out / 'records.jsonl'} keeps what was done; run again to resume") from None
    rows = summarize(records, methods, cfg.judges)
    return rows, write_report(out, cfg, rows, methods, cfg.judges, command)
