"""Loading a bundle into an Engine: which ARMs, how many threads, overlapped or not."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from .backends.llama_base import LlamaBase, default_threads
from .backends.onnx_arm import OnnxARM
from .backends.trunk import HeadARM, TrunkGroup
from .bundle import Bundle, check_arm_vocab
from .config import DEFAULTS
from .engine import Engine
from .errors import ConfigError
from .gguf import GGUFInfo, read_gguf
from .nudge import NudgeTable
from .plan import LoadPlan, arm_specs, make_plan

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


def load(
    weights: str,
    arms: list[str] | dict[str, float] | None = None,
    *,
    n_ctx: int = DEFAULTS["ctx"],
    threads: int | None = None,
    gpu_layers: int = 0,
    arm_device: str = DEFAULTS["arm_device"],
    arm_threads: int | None = None,
    parallel: bool | None = None,
    chat_template: str | Path | None = None,
    verify: bool = True,
    cores: int | None = None,
    trunk: str = DEFAULTS["trunk"],
) -> Engine:
    """Load a bundle folder (or a bare .gguf) and the chosen ARMs: plan, then build.

    `arms`: None loads every ARM of the bundle at its default weight; a list of
    "name=weight" / "path.onnx=weight" specs, or a {name: weight} dict, chooses.
    `chat_template`: its text, or a Path to a file. `parallel` overlaps base and ARM
    forwards in threads, with the cores split; None decides by the bundle's measurement,
    else by size (see `overlap_pays`). `cores`: the cores this engine may use (default:
    the machine's; a Ray actor passes its num_cpus). `trunk`: where heads on a shared trunk
    get their input (see `choose_tap`): "auto", "base" or "graph".
    """
    check_options(n_ctx=n_ctx, threads=threads, arm_threads=arm_threads, gpu_layers=gpu_layers, cores=cores)
    bundle = Bundle.open(weights, verify=verify)
    info = read_gguf(bundle.base_path)  # read once: for the plan's checks and for the base
    plan = make_plan(bundle, arms, chat_template, base_info=info)
    return build_engine(
        plan, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, arm_device=arm_device,
        arm_threads=arm_threads, parallel=parallel, cores=cores, base_info=info, trunk=trunk,
    )  # fmt: skip


def build_engine(
    plan: LoadPlan,
    *,
    n_ctx: int = DEFAULTS["ctx"],
    threads: int | None = None,
    gpu_layers: int = 0,
    arm_device: str = DEFAULTS["arm_device"],
    arm_threads: int | None = None,
    parallel: bool | None = None,
    cores: int | None = None,
    base_info: GGUFInfo | None = None,
    trunk: str = DEFAULTS["trunk"],
) -> Engine:
    """The engine a plan describes: placement and threads for this machine, then the backends
    (ARM sessions are created while llama.cpp loads the base: warm start), then the one check
    that needs them (each ARM's token list against the ids its graph scores)."""
    check_options(n_ctx=n_ctx, threads=threads, arm_threads=arm_threads, gpu_layers=gpu_layers, cores=cores)
    tap = choose_tap(plan, trunk)
    if tap is not None:  # the heads wait for the base's layer anyway: each forward gets every core
        parallel = False
    if parallel is None:
        parallel = plan.measured_parallel
    if parallel is None:
        parallel = overlap_pays(plan.base, [a.path for a in plan.arms])
    auto_base, auto_arm = split_threads(cores or default_threads(), plan.n_units, parallel)
    tapped = next(iter(plan.taps)) if tap is not None else None
    with ThreadPoolExecutor(max_workers=1) as pool:
        arms_future = pool.submit(_load_arms, list(plan.arms), arm_device, arm_threads or auto_arm, tapped)
        try:
            base = LlamaBase(
                plan.base, n_ctx=n_ctx, threads=threads or auto_base, gpu_layers=gpu_layers, info=base_info,
                tap=tap,
            )  # fmt: skip
        except BaseException:
            wait([arms_future])  # the base's error is the one to report
            raise
        loaded = arms_future.result()
    for arm in loaded.values():
        group = getattr(arm, "group", None)
        if group is not None and group.on_base and group.tap is None:
            group.attach(base)
    for a in plan.arms:
        vocab = getattr(loaded[a.name], "vocab_size", None)
        check_arm_vocab(
            a.name, plan.n_tokens[a.name], vocab, plan.n_base_tokens, plan.base.name, a.tokens_path
        )
    engine = Engine(base, loaded, plan.weights, chat_template=plan.chat_template, parallel=parallel)
    if plan.nudges is not None:
        engine.nudge_table = NudgeTable.load(plan.nudges, base.info.tokens)
    return engine


_OPTIONS = {  # option -> (command-line flag, smallest value, None allowed, what it means)
    "n_ctx": ("--ctx", 1, False, "tokens of context"),
    "threads": ("--threads", 1, True, "llama.cpp threads; leave it out for the cores"),
    "arm_threads": ("--arm-threads", 1, True, "onnxruntime threads per ARM; leave it out for automatic"),
    "gpu_layers": ("--gpu-layers", -1, False, "base layers on the GPU; -1 for all, 0 for none"),
    "cores": ("cores", 1, True, "cores this engine may use"),
}


def check_options(**values) -> None:
    """Load options in range, else a ConfigError naming the option (and its flag) and the fix."""
    for name, v in values.items():
        flag, lo, optional, meaning = _OPTIONS[name]
        if v is None and optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} ({flag}) must be an integer >= {lo} ({meaning}), got {v!r}")


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


_arm_specs = arm_specs  # the name distributed.py imports
