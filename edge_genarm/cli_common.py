"""What the commands of the command line share: their options, what the options mean, errors.

The command modules (cli_run, cli_export, cli_train, cli_eval, cli_batch, cli_pack,
server/command) import this module and nothing else of the CLI; cli.py registers them on the
`edge-genarm` group. Option defaults come from config.DEFAULTS. No math lives here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .config import DEFAULTS
from .errors import EdgeGenarmError
from .guidance import GUIDED_DRY, SamplingParams
from .nudge import NudgeConfig


def fail(e: Exception):
    """Stop the command with `e`'s message (click prints "Error: ..." and exits 1)."""
    raise click.ClickException(str(e)) from None


def _log(message: str) -> None:
    click.echo(message, err=True)


def default_weights() -> str:
    """No --weights: the default pack (built on first use), else the bare SmolLM2 GGUF."""
    from .pack import default_bundle

    try:
        return str(default_bundle(log=_log))
    except EdgeGenarmError as e:
        fail(e)


def weights_or_default(weights: str | None) -> str:
    """--weights as given (through `resolve_weights`), or the default pack when it is left out;
    an empty value is an error."""
    if weights is None:
        return default_weights()
    if not weights.strip():
        raise EdgeGenarmError(
            "--weights is empty: give a bundle folder or a .gguf file, or leave it out for the default pack"
        )
    return resolve_weights(weights)


def _pack_weights(name: str) -> str:
    from .pack import pack_bundle

    return str(pack_bundle(name, log=_log))


def _ollama_weights(name: str) -> str:
    from .ollama import resolve

    return str(resolve(name))  # the model's GGUF blob in the Ollama store, read in place


# A --weights (or --base) value that starts with one of these names a model by another scheme:
# prefix -> the function that turns the rest into a local path.
WEIGHTS_SCHEMES = {  # pack:NAME: pack NAME's bundle (built on first use); ollama:NAME[:TAG]: an Ollama model
    "pack:": _pack_weights,
    "ollama:": _ollama_weights,
}


def resolve_weights(spec: str) -> str:
    """A model given on the command line as a local path: a scheme of WEIGHTS_SCHEMES resolved,
    anything else as given."""
    for prefix, resolve in WEIGHTS_SCHEMES.items():
        if spec.startswith(prefix):
            return resolve(spec[len(prefix) :])
    return spec


def prompt_text(prompt: str | None) -> str:
    """PROMPT, or standard input when it is absent or '-' (UTF-8); an empty prompt is an error."""
    if prompt in (None, "-"):
        try:
            stdin = getattr(sys.stdin, "buffer", None)
            prompt = stdin.read().decode("utf-8") if stdin is not None else sys.stdin.read()
        except UnicodeDecodeError as e:
            fail(EdgeGenarmError(f"standard input is not UTF-8 text ({e}): send the prompt as UTF-8"))
    if not prompt.strip():
        fail(EdgeGenarmError("the prompt is empty: give PROMPT, or pipe the text on standard input"))
    return prompt


# ---------------------------------------------------------------------------
# shared options: each decorator adds its options in the order listed
# ---------------------------------------------------------------------------


def options(*opts):
    """One decorator applying `opts` so that --help lists them in the order given."""

    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return apply


model_options = options(
    click.option("--weights", "-m", help="Bundle folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    click.option("--base", type=click.Path(dir_okay=False),
                 help="Another .gguf for the bundle's ARMs to guide (weak-to-strong): it must share their "
                      "tokenizer; heads on a shared trunk then run their own trunk graph."),
    click.option("--arm", "arms", multiple=True, metavar="NAME=W",
                 help="ARM and weight, repeatable: a bundle name or a path to an .onnx file."),
    click.option("--no-guidance", is_flag=True, help="Sample from the base alone (A/B)."),
    click.option("--ctx", default=DEFAULTS["ctx"], show_default=True, help="Context length in tokens."),
    click.option("--threads", type=int, help="llama.cpp threads (default: the cores)."),
    click.option("--gpu-layers", default=DEFAULTS["gpu_layers"], show_default=True,
                 help="Base layers offloaded to the GPU (-1: all)."),
    click.option("--arm-device", default=DEFAULTS["arm_device"], show_default=True,
                 type=click.Choice(["auto", "cpu", "cuda", "coreml"]), help="onnxruntime device for ARMs."),
    click.option("--arm-threads", type=int, help="onnxruntime threads per ARM (default: by --parallel)."),
    click.option("--parallel/--sequential", default=None,
                 help="Overlap base and ARM forwards in threads, splitting the cores (default: by model sizes)."),
    click.option("--trunk", default=DEFAULTS["trunk"], show_default=True, type=click.Choice(["auto", "base", "graph"]),
                 help="Heads on a shared trunk read the base's own layer (base; the bundle must record a passed "
                      "base-tap gate) or run the trunk graph (graph); auto: base where allowed."),
    click.option("--chat-template", type=click.Path(exists=True, dir_okay=False),
                 help="A Jinja chat template file overriding the model's."),
    click.option("--merge-mix/--no-merge-mix", default=None,
                 help="--fast: run the pack's mix head merged at each weight mix (about 8% faster). Default: "
                      "where the pack's build checked it, the ends of replies included."),
)  # fmt: skip

sampling_options = options(
    click.option("--temperature", "--temp", default=DEFAULTS["temperature"], show_default=True, type=float),
    click.option("--top-k", default=DEFAULTS["top_k"], show_default=True, type=int, help="0 disables."),
    click.option("--top-p", default=DEFAULTS["top_p"], show_default=True, type=float, help="1 disables."),
    click.option("--min-p", default=DEFAULTS["min_p"], show_default=True, type=float, help="0 disables."),
    click.option("--repeat-penalty", default=DEFAULTS["repeat_penalty"], show_default=True, type=float,
                 help="llama.cpp's repeat penalty over the last --repeat-last-n tokens (1.0: off; Ollama uses 1.1)."),
    click.option("--repeat-last-n", default=DEFAULTS["repeat_last_n"], show_default=True, type=int),
    click.option("--dry-multiplier", "--dry", type=float,
                 help="DRY repetition penalty strength (0: off). Default: auto, "
                 f"{GUIDED_DRY} x (1 + the sum of the ARM weights) when an ARM is active or nudging "
                 "is on (guided replies loop without it), else off."),
    click.option("--seed", type=int, help="Seed for reproducible output."),
    click.option("--max-tokens", "-n", default=DEFAULTS["max_tokens"], show_default=True,
                 help="Tokens to generate at most."),
    click.option("--stop", multiple=True, help="Stop string, repeatable."),
    click.option("--system", "-s", help="System prompt."),
    click.option("--exact/--fast", "exact", default=None,
                 help="--fast runs the pack's mix head for any mix of its objectives (else the ARMs' heads) and "
                 "skips it where the base is confident (fastmode.py); --exact runs every ARM at every step, "
                 "the reference. Default: --fast where the pack's mix head serves the weights, else --exact."),
)  # fmt: skip

nudge_options = options(
    click.option("--nudge", is_flag=True, help="Entropy-triggered nudging (GGRO, edge variant)."),
    click.option("--nudge-tau", default=DEFAULTS["nudge_tau"], show_default=True, type=float,
                 help="Entropy trigger (nats)."),
    click.option("--nudge-gap", default=DEFAULTS["nudge_gap"], show_default=True, type=int,
                 help="Min tokens between sites."),
    click.option("--nudge-k", default=DEFAULTS["nudge_k"], show_default=True, type=int, help="Base top-K candidates."),
    click.option("--nudge-mode", default=DEFAULTS["nudge_mode"], show_default=True,
                 type=click.Choice(["force", "bias"])),
    click.option("--nudge-strength", default=DEFAULTS["nudge_strength"], show_default=True, type=float),
    click.option("--nudge-rollouts", default=DEFAULTS["nudge_rollouts"], show_default=True, type=int,
                 help="Verify this many candidates per site by rolling them out (needs ARMs; 0: off)."),
    click.option("--nudge-rollout-len", default=DEFAULTS["nudge_rollout_len"], show_default=True, type=int,
                 help="Rollout tokens."),
)  # fmt: skip


# ---------------------------------------------------------------------------
# what the shared options mean
# ---------------------------------------------------------------------------


def load_options(o: dict, portable: bool = False):
    """The load options (options.LoadOptions) of the model options `o`; `portable`: for another
    process or node (absolute paths, the chat template's text: Ray). Says which base the ARMs
    guide when --base is given."""
    from .options import LoadOptions

    base = o.get("base")
    opts = LoadOptions(
        weights_or_default(o["weights"]), tuple(o["arms"]) or None, n_ctx=o["ctx"], threads=o["threads"],
        gpu_layers=o["gpu_layers"], arm_device=o["arm_device"], arm_threads=o["arm_threads"],
        parallel=o["parallel"], chat_template=Path(o["chat_template"]) if o.get("chat_template") else None,
        trunk=o.get("trunk", DEFAULTS["trunk"]), base=None if base is None else resolve_weights(base),
        merge_mix=o.get("merge_mix"),
    )  # fmt: skip
    if opts.base is not None:
        _log(f"the ARMs of '{opts.weights}' guide base '{opts.base}' (no base tap: a shared trunk runs its graph)")
    return opts.portable() if portable else opts


def load_engine(o: dict):
    """The engine of the model options `o` (the chat template file is read and checked by load);
    says so when the GGUF has no chat template and none was given (prompts then go raw)."""
    from .loader import load

    engine = load(load_options(o))
    if getattr(engine, "prompt_format", "template") == "raw":
        _log(f"no chat template in {engine.base.path}: prompting raw (give one with --chat-template FILE)")
    return engine


def sampling_params(o: dict) -> SamplingParams:
    return SamplingParams(
        o["temperature"], o["top_k"], o["top_p"], o["min_p"], o["repeat_penalty"], o["repeat_last_n"],
        dry_multiplier=o.get("dry_multiplier"),
    )  # fmt: skip


def nudge_params(o: dict) -> NudgeConfig:
    """The --nudge-* values, whether or not --nudge is on."""
    return NudgeConfig(
        tau=o["nudge_tau"], min_gap=o["nudge_gap"], top_k=o["nudge_k"], mode=o["nudge_mode"],
        strength=o["nudge_strength"], rollouts=o["nudge_rollouts"], rollout_len=o["nudge_rollout_len"],
    )  # fmt: skip


def gen_kwargs(o: dict) -> dict:
    """Engine.generate/stream keywords from the sampling and nudge options."""
    return dict(
        sampling=sampling_params(o), seed=o["seed"], max_tokens=o["max_tokens"], stop=list(o["stop"]),
        guidance=not o["no_guidance"], system=o["system"], nudge=nudge_params(o) if o.get("nudge") else None,
        exact=o.get("exact"),
    )  # fmt: skip
