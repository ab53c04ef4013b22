"""What a load will build, resolved and checked from a bundle before any model runs.

Loading reads forward: the options (options.LoadOptions) -> the bundle (files, manifest) -> a
`LoadPlan` (which base and ARM files, their weights, token lists checked against the base's
vocabulary, the chat template, the nudge table loaded and checked) -> the loader builds the
backends from the plan (loader.build_engine). The plan holds paths, values and the nudge
table's arrays, so it pickles.

The ARMs may guide another base than the bundle's (`base=`, weak-to-strong): it must share
their tokenizer (each ARM's token ids are checked against it), and the base-tap records, made
on the bundle's own base, do not apply to it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import ArmEntry, Bundle, parse_arm_spec, resolve_arm
from .chat import check_template, read_template
from .errors import BundleError, ConfigError
from .gguf import GGUFInfo, read_gguf
from .nudge import NudgeTable
from .tokens import check_base_tokens, check_token_ids, load_arm_tokens


@dataclass(frozen=True)
class LoadPlan:
    root: Path
    base: Path
    arms: tuple[ArmEntry, ...]  # in load order
    weights: dict[str, float]  # each ARM's starting weight: the one asked for, else its default
    n_tokens: dict[str, int]  # each ARM's token-list length (its ids checked equal to the base's)
    n_base_tokens: int
    chat_template: str | None
    nudges: Path | None  # the nudge table file
    measured_parallel: bool | None  # the placement the manifest records for these ARMs, if any
    taps: dict[str, int] = field(default_factory=dict)  # trunk key -> base layer its heads can run on
    own_base: bool = True  # False: the ARMs guide another base than the bundle's (`base=`)
    nudge_table: NudgeTable | None = field(default=None, compare=False, repr=False)  # loaded from `nudges`
    mix: dict | None = None  # the manifest's mix head (backends.mix), when its trunk runs on this base's tap

    @property
    def mix_path(self) -> Path | None:
        return self.root / self.mix["file"] if self.mix else None

    @property
    def tap_layer(self) -> int | None:
        """The base layer whose output the heads of a trunk read (backends.capture), if any
        trunk of this plan passed its base-tap gate: one tap per base."""
        return next(iter(self.taps.values()), None)

    @property
    def n_units(self) -> int:
        """Forward units: each trunk (its heads run as one) and each ARM of its own."""
        return len({a.trunk.key if a.trunk else a.name for a in self.arms})


def arm_specs(bundle: Bundle, arms) -> list[tuple[str, float | None]]:
    """[(name or .onnx path, weight or None for the default)] from None (every ARM of the bundle),
    a {name: weight} dict or "NAME=W" strings."""
    if arms is None:
        return [(n, None) for n in bundle.arms]
    if isinstance(arms, dict):
        out = []
        for n, w in arms.items():
            ok = w is None or (isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w))
            if not ok:
                raise ConfigError(f"ARM weight for '{n}' must be a finite number, got {w!r}")
            out.append((n, None if w is None else float(w)))
        return out
    return [parse_arm_spec(s) for s in arms]


def make_plan(
    bundle: Bundle,
    arms=None,
    chat_template: str | Path | None = None,
    base_info: GGUFInfo | None = None,
    base: str | Path | None = None,
) -> LoadPlan:
    """The plan for loading `arms` (see arm_specs) of `bundle` over its base, or over `base`
    (another GGUF). Every check that needs no model running is done here, once: the base's
    vocabulary against the manifest, each ARM's token ids against the base's, the chat template
    (it must render a message), the nudge table against the base's vocabulary. `base_info`: the
    base's GGUF header when the caller has read it already."""
    entries = [(resolve_arm(bundle, name), w) for name, w in arm_specs(bundle, arms)]
    base_path = bundle.base_path if base is None else other_base(base)
    info = base_info or read_gguf(base_path)
    n_tokens = check_tokens(bundle, [e for e, _ in entries], info.tokens, base_path, own=base is None)
    template, origin = _template(chat_template, bundle, info, base_path, own=base is None)
    check_template(template, origin)
    nudges = bundle.manifest.get("nudges")
    nudge_path = bundle.root / nudges["file"] if nudges else None
    placement = bundle.manifest.get("placement", {}).get(",".join(sorted(e.name for e, _ in entries)))
    own = base is None  # the placement and the base-tap gate were measured on the bundle's own base
    taps = base_taps(bundle, [e for e, _ in entries]) if own else {}
    return LoadPlan(
        root=bundle.root,
        base=base_path,
        arms=tuple(e for e, _ in entries),
        weights={e.name: e.default_weight if w is None else w for e, w in entries},
        n_tokens=n_tokens,
        n_base_tokens=len(info.tokens),
        chat_template=template,
        nudges=nudge_path,
        measured_parallel=bool(placement["parallel"]) if isinstance(placement, dict) and own else None,
        taps=taps,
        own_base=own,
        nudge_table=NudgeTable.load(nudge_path, info.tokens) if nudge_path else None,
        mix=mix_entry(bundle, taps),
    )


def mix_entry(bundle: Bundle, taps: dict[str, int]) -> dict | None:
    """The manifest's mix head, when its trunk's heads run on the base's tap (it reads a second
    layer of the same base, and shares that trunk's LM head); else None (the fast mode then runs
    the separate ARMs)."""
    mix = bundle.manifest.get("mix")
    if not isinstance(mix, dict) or mix.get("trunk") not in taps:
        return None
    if not (bundle.root / str(mix.get("file", ""))).is_file():
        raise BundleError(f"the mix head '{mix.get('file')}' of '{bundle.root}' is missing: rebuild the pack")
    return mix


def other_base(base: str | Path) -> Path:
    """The GGUF given to be guided instead of the bundle's base: it must be a file."""
    p = Path(base).expanduser()
    if not p.is_file():
        raise BundleError(
            f"--base '{p}' is not a file: give a .gguf model that shares the ARMs' tokenizer, or leave "
            "--base out to guide the bundle's own base"
        )
    return p


def check_tokens(bundle: Bundle, entries, base_tokens: list[str], base_path: Path, own: bool) -> dict[str, int]:
    """{ARM name: token-list length} once each ARM's token ids are checked equal to the base's
    (and the bundle's own base against its manifest)."""
    if own:
        check_base_tokens(bundle, base_tokens)
        fix = None
    else:
        fix = (
            f"--base must share the tokenizer of the ARMs of '{bundle.root}' (a model of the same family "
            "and vocabulary), or leave --base out"
        )
    n_tokens = {}
    for e in entries:
        toks = load_arm_tokens(e.tokens_path, e.name)
        check_token_ids(e.name, toks, base_tokens, base_path.name, fix=fix)
        n_tokens[e.name] = len(toks)
    return n_tokens


def base_taps(bundle: Bundle, entries) -> dict[str, int]:
    """{trunk key: layer} for the trunks of `entries` whose heads may run on the base's own
    output of that layer: the manifest's `base_tap` record (export/base_tap.py) passed its gate
    on this very base file (its sha256 as the manifest records it). At most one (one tap per base)."""
    trunks = bundle.manifest.get("trunks", {})
    base_sha = bundle.manifest.get("files", {}).get(bundle.manifest["base"]["file"], {}).get("sha256")
    for key in dict.fromkeys(e.trunk.key for e in entries if e.trunk is not None):
        tap = trunks.get(key, {}).get("base_tap")
        if isinstance(tap, dict) and tap.get("passed") is True and base_sha and tap.get("base_sha256") == base_sha:
            layer = tap.get("layer")
            if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0:
                return {key: layer}
    return {}


def _template(
    given: str | Path | None, bundle: Bundle, info: GGUFInfo, base_path: Path, own: bool
) -> tuple[str | None, str]:
    """The chat template that will be used, and where it came from (for error messages): the one
    given, else the bundle's (for its own base only), else the base GGUF's."""
    if isinstance(given, Path):
        return read_template(given), f"file '{given}'"
    if given is not None:
        return given, "the chat_template given"
    if own and bundle.chat_template:
        return bundle.chat_template, f"'{bundle.root / 'manifest.json'}' (chat_template)"
    return info.get("tokenizer.chat_template"), f"GGUF file '{base_path}' (tokenizer.chat_template)"
