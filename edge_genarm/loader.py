"""Loading a bundle into an Engine: which ARMs, how many threads, overlapped or not."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from .backends.llama_base import LlamaBase, default_threads
from .backends.onnx_arm import OnnxARM
from .backends.trunk import HeadARM, TrunkGroup
from .bundle import (
    Bundle,
    check_arm_tokens,
    check_base_tokens,
    load_arm_tokens,
    parse_arm_spec,
    resolve_arm,
)
from .chat import check_template, read_template
from .engine import Engine
from .errors import ConfigError
from .nudge import NudgeTable


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


def measured_placement(bundle: Bundle, names: list[str]) -> bool | None:
    """The placement `edge-genarm bench --record` (or the pack build) measured fastest for these
    ARMs on this bundle: True overlapped, False sequential, None when never measured."""
    rec = bundle.manifest.get("placement", {}).get(",".join(sorted(names)))
    return None if not isinstance(rec, dict) else bool(rec.get("parallel"))


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
    n_ctx: int = 4096,
    threads: int | None = None,
    gpu_layers: int = 0,
    arm_device: str = "cpu",
    arm_threads: int | None = None,
    parallel: bool | None = None,
    chat_template: str | Path | None = None,
    verify: bool = True,
    cores: int | None = None,
) -> Engine:
    """Load a bundle folder (or a bare .gguf) and the chosen ARMs.

    `arms`: None loads every ARM of the bundle at its default weight; a list of
    "name=weight" / "path.onnx=weight" specs, or a {name: weight} dict, chooses.
    `parallel` overlaps base and ARM forwards in threads, with the cores split;
    None decides by size (see `overlap_pays`). `cores`: the cores this engine may use
    (default: the machine's; a Ray actor passes its num_cpus).
    """
    check_options(n_ctx=n_ctx, threads=threads, arm_threads=arm_threads, gpu_layers=gpu_layers, cores=cores)
    bundle = Bundle.open(weights, verify=verify)
    specs = _arm_specs(bundle, arms)
    if parallel is None:
        parallel = measured_placement(bundle, [n for n, _ in specs])
    if parallel is None:
        paths = [resolve_arm(bundle, n).path for n, _ in specs]
        parallel = overlap_pays(bundle.base_path, paths)
    n_units = len({(e.trunk.key if e.trunk else e.name) for e in (resolve_arm(bundle, n) for n, _ in specs)})
    auto_base, auto_arm = split_threads(cores or default_threads(), n_units, parallel)
    entries = [(resolve_arm(bundle, name), weight) for name, weight in specs]
    # the ARM sessions are created while llama.cpp loads the base (warm start); tokens checked after
    with ThreadPoolExecutor(max_workers=1) as pool:
        arms_future = pool.submit(_load_arms, [e for e, _ in entries], arm_device, arm_threads or auto_arm)
        try:
            base = LlamaBase(
                bundle.base_path, n_ctx=n_ctx, threads=threads or auto_base, gpu_layers=gpu_layers
            )
        except BaseException:
            wait([arms_future])  # the base's error is the one to report
            raise
        loaded = arms_future.result()
    check_base_tokens(bundle, base.info.tokens)
    for entry, _ in entries:
        check_arm_tokens(
            entry.name,
            load_arm_tokens(entry.tokens_path, entry.name),
            base.info.tokens,
            base.path.name,
            getattr(loaded[entry.name], "vocab_size", None),
            entry.tokens_path,
        )
    w = {e.name: e.default_weight if weight is None else weight for e, weight in entries}
    template, origin = _template(chat_template, bundle, base)
    check_template(template, origin)
    engine = Engine(base, loaded, w, chat_template=template, parallel=parallel)
    nudges = bundle.manifest.get("nudges")
    if nudges:
        engine.nudge_table = NudgeTable.load(bundle.root / nudges["file"], base.info.tokens)
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


def _template(given: str | None, bundle: Bundle, base: LlamaBase) -> tuple[str | None, str]:
    """The chat template that will be used, and where it came from (for error messages)."""
    if isinstance(given, Path):
        return read_template(given), f"file '{given}'"
    if given is not None:
        return given, "the chat_template given"
    if bundle.chat_template:
        return bundle.chat_template, f"'{bundle.root / 'manifest.json'}' (chat_template)"
    return base.info.get("tokenizer.chat_template"), f"GGUF file '{base.path}' (tokenizer.chat_template)"


def _load_arms(entries, device: str, threads: int) -> dict:
    """name -> ARM backend. Heads on one trunk become one TrunkGroup. Sessions are created side
    by side: reading the ONNX files dominates a warm start."""
    groups: dict[str, list] = {}
    for e in entries:
        if e.trunk is not None:
            groups.setdefault(e.trunk.key, []).append(e)

    def group(es):
        t = es[0].trunk
        g = TrunkGroup(
            t.path, {e.name: e.path for e in es}, t.lm_head, device=device, threads=threads, label=t.key
        )
        return {e.name: HeadARM(g, e.name) for e in es}

    jobs = [(group, es) for es in groups.values()]
    jobs += [(lambda es: {es[0].name: OnnxARM(es[0].path, es[0].name, device=device, threads=threads)}, [e])
             for e in entries if e.trunk is None]  # fmt: skip
    loaded: dict = {}
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        for out in pool.map(lambda j: j[0](j[1]), jobs):
            loaded.update(out)
    return {e.name: loaded[e.name] for e in entries}


def _arm_specs(bundle: Bundle, arms) -> list[tuple[str, float | None]]:
    if arms is None:
        return [(n, None) for n in bundle.arms]
    if isinstance(arms, dict):
        return [(n, float(w) if w is not None else None) for n, w in arms.items()]
    return [parse_arm_spec(s) for s in arms]
