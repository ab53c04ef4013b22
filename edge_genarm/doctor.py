"""`edge-genarm doctor`: what this machine runs, and what to do about each problem."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator

from .errors import EdgeGenarmError

Check = tuple[str, bool, str, str]  # (name, ok, what was found, the fix when not ok)


def check_llama() -> Iterator[Check]:
    try:
        import llama_cpp
    except ImportError as e:
        yield "llama.cpp", False, f"llama-cpp-python missing ({e})", "run scripts/setup.sh"
        return
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    backends = [b for b in ("CUDA", "Metal", "Vulkan", "HIP", "SYCL") if b.upper() in info.upper()]
    yield (
        "llama.cpp",
        True,
        f"llama-cpp-python {llama_cpp.__version__}, backends: "
        f"{', '.join(['CPU', *backends])}; GPU offload {'available' if gpu else 'not compiled in'}",
        "",
    )
    simd = [f for f in ("AVX2", "AVX512", "NEON", "FMA", "F16C") if f"{f} = 1" in info]
    yield "llama.cpp CPU", True, "SIMD: " + (", ".join(simd) or "none reported"), ""
    if not gpu:
        yield (
            "llama.cpp GPU",
            True,
            "CPU only (--gpu-layers is ignored)",
            "for a GPU: EDGE_GENARM_CMAKE_ARGS='-DGGML_CUDA=on' (or -DGGML_METAL=on) bash scripts/setup.sh",
        )


def check_onnxruntime() -> Iterator[Check]:
    try:
        import onnxruntime as ort
    except ImportError:
        yield (
            "onnxruntime",
            False,
            "not installed (needed for ARMs)",
            "pip install 'edge-genarm[cpu]' (or [gpu] for CUDA; never both)",
        )
        return
    avail = ort.get_available_providers()
    yield "onnxruntime", True, f"{ort.__version__}, providers offered: {', '.join(avail)}", ""
    try:
        from importlib.metadata import version

        version("onnxruntime")
        version("onnxruntime-gpu")
        yield (
            "onnxruntime packages",
            False,
            "both onnxruntime and onnxruntime-gpu are installed",
            "they overwrite each other: uninstall both, then install exactly one",
        )
    except Exception:
        pass


def check_threads() -> Iterator[Check]:
    from .backends.llama_base import default_threads

    n = os.cpu_count() or 1
    yield (
        "threads",
        True,
        f"{n} logical cores; base uses {default_threads()} threads; ARMs get all "
        "cores when run in turn, or the cores are split when overlapped (--parallel)",
        "",
    )


def check_weights(weights: str | None, arms: list[str] | None) -> Iterator[Check]:
    from .loader import load

    try:
        engine = load(weights, arms)
    except EdgeGenarmError as e:
        yield "bundle", False, str(e).split(":")[0], str(e)
        return
    base = engine.base
    yield (
        "bundle",
        True,
        f"{base.path}: vocab {base.n_vocab}, context {base.n_ctx}, "
        f"{base.threads} threads, {base.gpu_layers} GPU layers requested",
        "",
    )
    for name, arm in engine.arms.items():
        running = arm.session.get_providers()
        yield f"ARM {name}", True, f"running on {', '.join(running)}; {arm.threads} threads", ""
    try:
        c = engine.generate("Hello", max_tokens=4, seed=0)
        s = c.timings.summary()
        yield "generation", True, f"{len(c.tokens)} tokens at {s['tok_per_s']:.1f} tok/s", ""
    except EdgeGenarmError as e:
        yield "generation", False, "failed", str(e)
    engine.close()


def run_checks(weights: str | None, arms: list[str] | None) -> list[Check]:
    out: list[Check] = [("platform", True, f"{platform.platform()}, Python {platform.python_version()}", "")]
    for gen in (check_llama(), check_onnxruntime(), check_threads(), check_weights(weights, arms)):
        out.extend(gen)
    return out


def format_checks(checks: list[Check]) -> str:
    lines = []
    for name, ok, found, fix in checks:
        lines.append(f"[{'ok' if ok else '!!'}] {name:<20} {found}")
        if fix and (not ok or "GPU" in name):
            lines.append(f"     {'':<20} -> {fix}")
    bad = sum(not ok for _, ok, _, _ in checks)
    lines.append(f"\n{bad} problem(s) found" if bad else "\nno problems found")
    return "\n".join(lines)
