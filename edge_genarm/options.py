"""The load options: one picklable object that says what to load and how, built by the Python
API (`edge_genarm.load`), the command line and the Ray driver alike.

It holds plain values only (paths as strings, the chat template as a Path or its text), so it
pickles to any node, where a Ray actor loads its engine from it (`load`). Its values are
checked once, when it is built: a bad value is a ConfigError naming the option and its flag.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .chat import read_template
from .config import DEFAULTS
from .errors import ConfigError

_RANGES = {  # option -> (command-line flag, smallest value, None allowed, what it means)
    "n_ctx": ("--ctx", 1, False, "tokens of context"),
    "threads": ("--threads", 1, True, "llama.cpp threads; leave it out for the cores"),
    "arm_threads": ("--arm-threads", 1, True, "onnxruntime threads per ARM; leave it out for automatic"),
    "gpu_layers": ("--gpu-layers", -1, False, "base layers on the GPU; -1 for all, 0 for none"),
    "cores": ("cores", 1, True, "cores this engine may use"),
}


def check_options(**values) -> None:
    """Load options in range, else a ConfigError naming the option (and its flag) and the fix."""
    for name, v in values.items():
        flag, lo, optional, meaning = _RANGES[name]
        if v is None and optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} ({flag}) must be an integer >= {lo} ({meaning}), got {v!r}")


@dataclass(frozen=True)
class LoadOptions:
    """What to load and how.

    `weights`: a bundle folder or a .gguf file. `arms`: None loads every ARM of the bundle at
    its default weight; "NAME=W" / "path.onnx=W" specs or a {name: weight} dict choose.
    `base`: another GGUF for the bundle's ARMs to guide (weak-to-strong); it must share their
    tokenizer, and heads on a shared trunk then run their own trunk graph. `chat_template`: a
    Path to a file, or the template's text. `parallel` overlaps base and ARM forwards (None:
    by the bundle's measurement, else by size). `cores`: the cores this engine may use (a Ray
    actor passes its CPUs). `trunk`: where heads on a shared trunk get their input
    ("auto", "base" or "graph"; see loader.choose_tap). `merge_mix`: whether the fast mode runs
    the pack's mix head merged at each alpha (backends/mix_merge.py; faster): None, where the
    pack's build checked the merged head, the ends of replies included; True, also where it
    checked only its KL (merged without a bias, it ended replies 22% less often at concise=1:
    docs/speed.md); False, never. For Ray, `weights` must name the same
    path on every node (a shared folder, or `edge-genarm pack build` run on each).
    """

    weights: str
    arms: tuple[str, ...] | dict[str, float] | None = None
    n_ctx: int = DEFAULTS["ctx"]
    threads: int | None = None
    gpu_layers: int = DEFAULTS["gpu_layers"]
    arm_device: str = DEFAULTS["arm_device"]
    arm_threads: int | None = None
    parallel: bool | None = None
    chat_template: str | Path | None = None
    verify: bool = True
    cores: int | None = None
    trunk: str = DEFAULTS["trunk"]
    base: str | None = None
    merge_mix: bool | None = None

    def __post_init__(self):
        check_options(
            n_ctx=self.n_ctx, threads=self.threads, arm_threads=self.arm_threads, gpu_layers=self.gpu_layers,
            cores=self.cores,
        )  # fmt: skip
        if isinstance(self.arms, list):  # a list pickles and compares like the tuple it is
            object.__setattr__(self, "arms", tuple(self.arms))
        if self.base is not None and not str(self.base).strip():
            raise ConfigError("--base is empty: give a .gguf file for the ARMs to guide, or leave it out")

    def portable(self) -> LoadOptions:
        """These options for another process or node: absolute paths, the chat template's text."""
        template = self.chat_template
        return replace(
            self,
            weights=_absolute(self.weights),
            base=None if self.base is None else _absolute(self.base),
            chat_template=read_template(template) if isinstance(template, Path) else template,
        )

    def arm_weights(self) -> dict[str, float]:
        """{ARM name: weight} that `load` will give the engine, read from the manifest alone."""
        from .bundle import Bundle, resolve_arm
        from .plan import arm_specs

        bundle = Bundle.open(self.weights, verify=False)
        entries = [(resolve_arm(bundle, n), w) for n, w in arm_specs(bundle, self.arms)]
        return {e.name: e.default_weight if w is None else w for e, w in entries}


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())
