"""The command line: the `edge-genarm` group, the options its commands share, error handling.

The commands live beside what they drive and register themselves on `main` (bottom of this
file): cli_run (generate, chat, bench), cli_export (export ..., calibrate-tau), cli_train
(prefs, train-arm, train-rm), cli_eval (eval, compare), cli_batch (batch), cli_pack (pack ...,
bundle inspect, doctor), server/command (serve). Option defaults come from config.DEFAULTS;
prompt files are read by records.read_prompts. No math lives here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .config import DEFAULTS
from .errors import EdgeGenarmError
from .guidance import GUIDED_DRY, SamplingParams
from .nudge import NudgeConfig


def fail(e: Exception):
    raise click.ClickException(str(e)) from None


def default_weights() -> str:
    """No --weights: the default pack (built on first use), else the bare SmolLM2 GGUF."""
    from .pack import default_bundle

    try:
        return str(default_bundle(log=lambda m: click.echo(m, err=True)))
    except EdgeGenarmError as e:
        fail(e)


def weights_or_default(weights: str | None) -> str:
    """--weights as given, or the default pack when it is left out; `pack:NAME` is pack NAME's
    bundle (built on first use, like the default); an empty value is an error."""
    if weights is None:
        return default_weights()
    if not weights.strip():
        raise EdgeGenarmError(
            "--weights is empty: give a bundle folder or a .gguf file, or leave it out for the default pack"
        )
    if weights.startswith("pack:"):
        from .pack import pack_bundle

        return str(pack_bundle(weights[len("pack:") :], log=lambda m: click.echo(m, err=True)))
    return weights


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


def load_engine(o: dict):
    from .loader import load

    template = Path(o["chat_template"]) if o.get("chat_template") else None  # read (and checked) by load
    return load(
        weights_or_default(o["weights"]), list(o["arms"]) or None, n_ctx=o["ctx"], threads=o["threads"],
        gpu_layers=o["gpu_layers"], arm_device=o["arm_device"], arm_threads=o["arm_threads"],
        parallel=o["parallel"], chat_template=template, trunk=o.get("trunk", DEFAULTS["trunk"]),
    )  # fmt: skip


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
    )  # fmt: skip


# ---------------------------------------------------------------------------
# the group and its settings
# ---------------------------------------------------------------------------


@click.group()
@click.version_option(package_name="edge-genarm")
@click.pass_context
def main(ctx):
    """edge-genarm: steer a local LLM with autoregressive reward models, offline.

    Settings: command line > EDGE_GENARM_<KEY> environment > config file
    (~/.config/edge-genarm/config.toml) > built-in defaults; see `config show`.
    """
    from .config import default_map, effective

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if ctx.invoked_subcommand == "config":
        return  # `config show` reports problems itself
    try:
        ctx.default_map = default_map(effective())
    except EdgeGenarmError as e:
        fail(e)


@main.group("config")
def config_group():
    """The effective settings and where each came from."""


@config_group.command("show")
def config_show():
    from .config import config_path, effective

    try:
        settings = effective()
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"# config file: {config_path()}")
    for k, (v, src) in settings.items():
        click.echo(f"{k:<16}= {v!r:<30} ({src})")


# Commands that live in their own modules register themselves on `main` (they use the helpers above).
from . import cli_batch, cli_eval, cli_export, cli_pack, cli_run, cli_train  # noqa: E402, F401
from .server.command import serve_command  # noqa: E402  (edge_genarm/server/)

main.add_command(serve_command(model_options, load_engine))

if __name__ == "__main__":
    from edge_genarm.cli import main as _main  # the imported module: every command is registered on it

    _main()
