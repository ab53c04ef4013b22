"""Loading a bundle into an Engine, read top to bottom: `load(options)` -> the bundle opened ->
its plan (plan.make_plan: every check that needs no model, done once) -> `build_engine`: which
placement, how many threads, overlapped or not, the base tapped or not, then the backends."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from .backends.llama_base import LlamaBase, default_threads
from .backends.onnx_arm import OnnxARM
from .backends.trunk import HeadARM, TrunkGroup
from .bundle import Bundle
from .engine import Engine
from .errors import ConfigError
from .gguf import GGUFInfo, read_gguf
from .options import LoadOptions
from .plan import LoadPlan, make_plan, other_base
from .tokens import check_arm_vocab

log = logging.getLogger("edge_genarm")


def overlap_pays(base_path, arm_paths) -> bool:
    """Overlapping forwards pays when the ARMs cost about as much as the base.

    Measured on 2 cores (bench): a 25 MB ARM beside a 98 MB base ran 0.72x as fast
    overlapped (the base lost a core for a short ARM step); 170 MB and 540 MB ARMs
    ran 1.19x and 1.26x faster overlapped. Rule: overlap when the ARM files weigh
    at least half the base's.
    """
    if not arm_paths:
        return False
    arm_bytes = sum(p.stat().st_size for ap in arm_paths for p in ap.parent.glob(ap.name + "*"))
    return arm_bytes >= 0.5 * base_path.stat().st_size


def split_threads(cores: int, n_arms: int, parallel: bool) -> tuple[int, int]:
    """(base threads, threads per ARM). Sequential: every forward gets all cores.
    Overlapped: the cores are split so that llama.cpp's and onnxruntime's threads
    do not fight over the same cores (FACTS.md: spinning threads on 2 cores)."""
    if not parallel or n_arms == 0:
        return cores, cores
    arm = max(1, cores // (n_arms + 1))
    return max(1, cores - arm * n_arms), arm


def load(weights: str | LoadOptions, arms: list[str] | dict[str, float] | None = None, **kw) -> Engine:
    """Load a bundle folder (or a bare .gguf) and the chosen ARMs: options -> bundle -> plan
    -> engine. `weights` is a LoadOptions, or a path that, with `arms` and the keywords, makes
    one (see options.LoadOptions for each option)."""
    opts = weights if isinstance(weights, LoadOptions) else LoadOptions(weights, arms, **kw)
    if isinstance(weights, LoadOptions) and (arms is not None or kw):
        raise TypeError("load(options) takes no other arguments: set them on the LoadOptions")
    plan, info = open_plan(opts)
    return build_engine(plan, opts, base_info=info)


def open_plan(opts: LoadOptions) -> tuple[LoadPlan, GGUFInfo]:
    """The bundle opened and the plan made from it (every check that needs no model), with the
    header of the base GGUF that was read for it (read once: the base backend reuses it)."""
    bundle = Bundle.open(opts.weights, verify=opts.verify)
    info = read_gguf(bundle.base_path if opts.base is None else other_base(opts.base))
    plan = make_plan(bundle, opts.arms, opts.chat_template, base_info=info, base=opts.base)
    return plan, info


def build_engine(
    plan: LoadPlan, opts: LoadOptions | None = None, *, base_info: GGUFInfo | None = None, **kw
) -> Engine:
    """The engine a plan describes: placement and threads for this machine, then the backends
    (ARM sessions are created while llama.cpp loads the base: warm start), then the one check
    that needs them (each ARM's token list against the ids its graph scores). `opts`: the load
    options (the keywords make them when it is None; their weights, arms and template are the
    plan's)."""
    opts = opts if opts is not None else LoadOptions(str(plan.root), **kw)
    tap = choose_tap(plan, opts.trunk)
    parallel = opts.parallel
    if tap is not None:  # the heads wait for the base's layer anyway: each forward gets every core
        parallel = False
    if parallel is None:
        parallel = plan.measured_parallel
    if parallel is None:
        parallel = overlap_pays(plan.base, [a.path for a in plan.arms])
    auto_base, auto_arm = split_threads(opts.cores or default_threads(), plan.n_units, parallel)
    tapped = next(iter(plan.taps)) if tap is not None else None
    with ThreadPoolExecutor(max_workers=1) as pool:
        arms_future = pool.submit(
            _load_arms, list(plan.arms), opts.arm_device, opts.arm_threads or auto_arm, tapped
        )
        try:
            mix = plan.mix if tap is not None else None
            base = LlamaBase(
                plan.base, n_ctx=opts.n_ctx, threads=opts.threads or auto_base, gpu_layers=opts.gpu_layers,
                info=base_info, tap=tap if mix is None else [tap, int(mix["tap_layer"])],
            )  # fmt: skip
        except BaseException:
            wait([arms_future])  # the base's error is the one to report
            raise
        loaded = arms_future.result()
    for arm in loaded.values():
        group = getattr(arm, "group", None)
        if group is not None and group.on_base and group.tap is None:
            group.attach(base)
    mix_unit = None
    if mix is not None:
        from .backends.mix import MixUnit

        group = next(g for g in (getattr(a, "group", None) for a in loaded.values()) if g is not None and g.tap is base)
        # one thread unless asked: a 4-layer int4 head at one position took 1.28 ms on one thread and
        # 1.70 on two (2 cores, docs/speed.md): too little work to split
        mix_unit = MixUnit(plan.mix_path, mix["objectives"], int(mix["tap_layer"]), group, device=opts.arm_device,
                           threads=opts.arm_threads or 1, merge=_merge_allowed(mix, opts.merge_mix),
                           calibration=_calibration(plan, mix))  # fmt: skip
    for a in plan.arms:
        vocab = getattr(loaded[a.name], "vocab_size", None)
        check_arm_vocab(
            a.name, plan.n_tokens[a.name], vocab, plan.n_base_tokens, plan.base.name, a.tokens_path
        )
    return Engine(
        base, loaded, plan.weights, chat_template=plan.chat_template, parallel=parallel,
        nudge_table=plan.nudge_table, mix=mix_unit,
    )  # fmt: skip


def _calibration(plan: LoadPlan, mix: dict) -> Path | None:
    """The mix head's calibration (the merge's bias, backends/mix_merge.py), where the pack has one."""
    name = (mix.get("merged") or {}).get("calibration")
    return plan.root / name if name else None


def _merge_allowed(mix: dict, asked: bool | None = None) -> bool | str:
    """True when the pack's build checked the mix head merged at an alpha (export/lean_mix.py) and
    it passed: its KL and (unless `asked` is True) its ends of replies; else why it runs as shipped.
    `asked`: LoadOptions.merge_mix."""
    if asked is False:
        return "not asked for (--no-merge-mix)"
    rec = mix.get("merged") or {}
    if rec.get("passed") is True and (asked or "ends_rel_err" in rec):
        return True
    if rec.get("passed") is True:
        return ("the pack's build did not check the merged head's ends of replies (`edge-genarm pack build "
                "NAME --force` checks them; --merge-mix merges anyway)")
    if "kl_to_fp32" in rec:
        return f"merged, its KL to the float head was {rec['kl_to_fp32']:.3f} at the pack's build"
    return rec.get("why") or ("the pack was built before merged heads were checked "
                              "(`edge-genarm pack build NAME --force` checks them)")  # fmt: skip


TRUNK_MODES = ("auto", "base", "graph")


def choose_tap(plan: LoadPlan, trunk: str = "auto") -> int | None:
    """The base layer to tap for heads on a shared trunk, or None to run the trunk graph.

    "graph": the trunk graph (the ARMs' own fp32/int8 trunk; exact against the whole ARMs).
    "base": the base's own output of that layer, read as llama.cpp decodes (backends.capture):
    the trunk costs nothing, but it is the base's quantized arithmetic, so the bundle must
    record a passed base-tap gate for this base (export/base_tap.py); an error otherwise.
    "auto": "base" where the bundle records a passed gate and the callback compiles, else
    "graph". Measured on 2 cores (scripts/bench_tap.py): one ARM at 0.5 ran at 0.60x and 0.72x
    unguided tapped, against 0.44x with the int8 trunk graph."""
    if trunk not in TRUNK_MODES:
        raise ConfigError(f"--trunk must be one of {', '.join(TRUNK_MODES)}, got {trunk!r}")
    if trunk == "graph" or not any(a.trunk for a in plan.arms):
        return None
    layer = plan.tap_layer
    if layer is None:
        if trunk == "base" and not plan.own_base:
            raise ConfigError(
                f"--trunk base: the ARMs guide --base '{plan.base}', and a base-tap gate passes only on the "
                "base it was measured on (the bundle's own): use --trunk graph"
            )
        if trunk == "base":
            raise ConfigError(
                f"--trunk base: no trunk of these ARMs in '{plan.root}' records a passed base-tap gate "
                "for its base: run `edge-genarm export base-tap BUNDLE`, or use --trunk graph"
            )
        return None
    from .backends.capture import CaptureUnavailable, load_capture

    try:
        load_capture()
    except (CaptureUnavailable, OSError) as e:
        if trunk == "base":
            raise ConfigError(f"--trunk base needs llama.cpp's eval callback compiled here: {e}") from None
        log.info("running the trunk graph: the base-tap callback is unavailable (%s)", e)
        return None
    return layer


def _load_arms(entries, device: str, threads: int, tapped: str | None = None) -> dict:
    """name -> ARM backend. Heads on one trunk become one TrunkGroup (on the base's own trunk
    when its key is `tapped`). Sessions are created side by side: reading the ONNX files
    dominates a warm start."""
    groups: dict[str, list] = {}
    for e in entries:
        if e.trunk is not None:
            groups.setdefault(e.trunk.key, []).append(e)

    def group(es):
        t = es[0].trunk
        g = TrunkGroup(
            t.path, {e.name: e.path for e in es}, t.lm_head, device=device, threads=threads, label=t.key,
            on_base=t.key == tapped,
        )  # fmt: skip
        return {e.name: HeadARM(g, e.name) for e in es}

    jobs = [(group, es) for es in groups.values()]
    jobs += [(lambda es: {es[0].name: OnnxARM(es[0].path, es[0].name, device=device, threads=threads)}, [e])
             for e in entries if e.trunk is None]  # fmt: skip
    loaded: dict = {}
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        for out in pool.map(lambda j: j[0](j[1]), jobs):
            loaded.update(out)
    return {e.name: loaded[e.name] for e in entries}
