"""`edge-genarm export ...` and `calibrate-tau`: build and check bundles (edge_genarm/export/).

The heavy tooling (torch, transformers, optimum) is imported only when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import fail, load_engine, model_options, options, resolve_weights
from .config import DEFAULTS
from .errors import EdgeGenarmError
from .records import read_prompts


@click.group("export")
def export_group():
    """Build bundles: base -> GGUF, ARM -> ONNX, each checked against its source."""


@export_group.command("base")
@click.argument("source")  # a path, or ollama:NAME[:TAG] (resolve_weights)
@click.option("-o", "--out", required=True, type=click.Path(), help="Bundle folder.")
@click.option("--quant", default="f16", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0"]))
@click.option("--force", is_flag=True, help="Redo / replace an existing export.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False),
              help="A Jinja chat template file the bundle prompts with (over the GGUF's own; a pretrained "
                   "model without one is prompted raw otherwise).")
def export_base_cmd(source, out, quant, force, chat_template):
    """SOURCE: a Hugging Face folder (converted by llama.cpp's converter), a .gguf (adopted) or
    ollama:NAME[:TAG] (the model's GGUF in the Ollama store, adopted)."""
    from edge_genarm.export.commands import export_base

    try:
        source = resolve_weights(source)
        if not Path(source).exists():
            raise EdgeGenarmError(f"'{source}' does not exist: give a Hugging Face folder, a .gguf or ollama:NAME")
        export_base(source, out, quant, force)
        if chat_template:
            from edge_genarm.chat import read_template
            from edge_genarm.export.commands import set_chat_template

            set_chat_template(out, read_template(chat_template))
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"base written to {out}")


# --quantize and the gate's held-out pairs (the same split train-arm held out)
quantize_options = options(
    click.option("--quantize", type=click.Choice(["int4", "int8"]),
                 help="Weight-only MatMulNBits quantization, gated on held-out pairs."),
    click.option("--block-size", default=32, show_default=True, help="Quantization block (weights per scale)."),
    click.option("--accuracy-level", default=4, show_default=True,
                 help="MatMulNBits compute: 4 = int8 activations (fastest on CPU), 0 = fp32."),
    click.option("--pairs", "pairs", multiple=True,
                 help="[NAME=]pairs.jsonl the ARM was trained on: its held-out split gates quantization."),
    click.option("--eval-frac", default=0.1, show_default=True, help="As given to train-arm."),
    click.option("--max-len", default=512, show_default=True, help="As given to train-arm."),
    click.option("--seed", "pair_seed", default=0, show_default=True, help="As given to train-arm."),
)  # fmt: skip


def pair_specs(o: dict, names) -> dict:
    """--pairs [NAME=]FILE -> {name: PairSpec}; a bare FILE applies to every named ARM."""
    from edge_genarm.export.share import PairSpec

    out = {}
    for item in o.get("pairs") or ():
        name, sep, path = item.partition("=")
        targets = [name] if sep else list(names)
        path = path if sep else item
        if not Path(path).is_file():
            raise click.BadParameter(f"pairs file '{path}' does not exist", param_hint="--pairs")
        for n in targets:
            out[n] = PairSpec(Path(path), o["max_len"], o["eval_frac"], o["pair_seed"])
    return out


@export_group.command("arm")
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(exists=True), help="Bundle folder.")
@click.option("--name", required=True, help="The ARM's name in the bundle (e.g. positive).")
@click.option(
    "--beta-r", type=float, help="beta_r the ARM was trained with (weights compare only at equal beta_r)."
)
@click.option("--weight", default=1.0, show_default=True, help="Default weight.")
@click.option("--layers", type=int, help="Keep only the first N decoder layers (a smaller ARM).")
@quantize_options
@click.option("--force", is_flag=True)
def export_arm_cmd(
    source, out, name, beta_r, weight, layers, force, quantize, block_size, accuracy_level, **o
):
    """SOURCE: a Hugging Face folder or a .gguf (dequantized) sharing the base's tokenizer."""
    from edge_genarm.export.commands import export_arm

    try:
        pairs = pair_specs(o, [name]).get(name)
        export_arm(
            source, out, name, beta_r, weight, quantize, layers, force, block_size, accuracy_level, pairs
        )
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"ARM '{name}' added to {out}")


@export_group.command("rm")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(exists=True), help="Bundle folder.")
@click.option("--name", required=True, help="The reward model's name in the bundle (e.g. positive).")
@click.option("--quantize", type=click.Choice(["int4", "int8"]), help="Weight-only, gated on held-out pairs.")
@click.option("--block-size", default=32, show_default=True, help="Quantization block (weights per scale).")
@click.option(
    "--accuracy-level", default=4, show_default=True, help="MatMulNBits compute: 4 = int8 activations."
)
@click.option(
    "--pairs",
    type=click.Path(exists=True, dir_okay=False),
    help="Pairs it was trained on (default: the file train-rm recorded); gates --quantize.",
)
@click.option("--force", is_flag=True)
def export_rm_cmd(source, out, name, quantize, block_size, accuracy_level, pairs, force):
    """SOURCE: a `train-rm` output folder: ONNX with KV cache (reward per position), parity-checked."""
    from edge_genarm.export.rm_export import export_rm

    try:
        export_rm(source, out, name, quantize, block_size, accuracy_level, pairs, force)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"reward model '{name}' added to {out}")


@export_group.command("share-trunk")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--arm", "arms", multiple=True, help="An ARM to move onto the shared trunk (default: all).")
@click.option("--layer", type=int,
              help="Cut at this layer: the first one training changed (L-N for a LoRA on the last N of L "
              "layers). Default: where sibling ARMs first differ; one ARM needs it.")
@quantize_options
def export_share_cmd(bundle, arms, layer, quantize, block_size, accuracy_level, **o):
    """Put sibling ARMs (one init, adapters on the last layers) on one shared trunk and LM head;
    or one ARM on a trunk of its own first layers (--layer), whose heads can then run on the base's
    own layer output (`export base-tap`)."""
    from edge_genarm.export.share import share_trunk

    try:
        m = share_trunk(bundle, list(arms) or None, quantize, block_size, accuracy_level, pair_specs(o, arms),
                        layer=layer)  # fmt: skip
    except EdgeGenarmError as e:
        fail(e)
    shared = [n for n, a in m["arms"].items() if "trunk" in a]
    click.echo(f"ARMs {', '.join(shared)} of {bundle} now share one trunk")


@export_group.command("base-tap")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--trunk-id", help="The shared trunk to gate (default: the bundle's only one).")
@click.option("--pairs", "pairs", multiple=True,
              help="[NAME=]pairs.jsonl the ARM was trained on: its held-out split gates the tap.")
@click.option("--eval-frac", default=0.1, show_default=True, help="As given to train-arm.")
@click.option("--max-len", default=512, show_default=True, help="As given to train-arm.")
@click.option("--seed", "pair_seed", default=0, show_default=True, help="As given to train-arm.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: as the runtime picks).")
def export_base_tap_cmd(bundle, trunk_id, threads, **o):
    """Let the heads of a shared trunk run on the base's own layer output (--trunk base/auto):
    gated on held-out pairs (accuracy within 0.02 of fp32) and recorded in the manifest."""
    from edge_genarm.export.base_tap import base_tap

    from .manifest import read_manifest

    try:
        names = [n for n, a in read_manifest(Path(bundle)).get("arms", {}).items() if "trunk" in a]
        rec = base_tap(bundle, pair_specs(o, names), trunk_key=trunk_id, threads=threads)
    except EdgeGenarmError as e:
        fail(e)
    if not rec["passed"]:
        fail(EdgeGenarmError(f"the base tap of '{bundle}' failed its gate (recorded): the trunk graph stays in use"))
    click.echo(f"the heads of {bundle} run on the base's layer {rec['layer']} output (--trunk auto)")


@export_group.command("nudges")
@click.option(
    "--reward-model",
    "source",
    required=True,
    type=click.Path(exists=True),
    help="A sequence-classification reward model or an ARM (HF folder or .gguf) sharing the base's tokenizer.",
)
@click.option(
    "--calibration",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='JSONL of {"prompt": ...}.',
)
@click.option("-o", "--out", required=True, type=click.Path(exists=True), help="Bundle folder.")
@click.option("--prompts", "n_prompts", default=32, show_default=True, help="Calibration prompts used.")
@click.option("--max-tokens", default=48, show_default=True, help="Response length per prompt.")
@click.option("--clusters", default=0, show_default=True, help="Context clusters (0: one global direction).")
@click.option(
    "--tau",
    default=DEFAULTS["nudge_tau"],
    show_default=True,
    help="Positions with base entropy >= tau give gradients.",
)
def export_nudges_cmd(source, calibration, out, n_prompts, max_tokens, clusters, tau):
    """Precompute nudge-token scores from a reward model's gradients into the bundle."""
    from edge_genarm.export.nudges import export_nudges

    try:
        meta = export_nudges(out, source, calibration, n_prompts, max_tokens, clusters, tau=tau)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"nudges written to {out}: {meta['n_sites']} gradient sites, {meta['clusters']} clusters")


@click.command("calibrate-tau")
@model_options
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--target-rate", default=0.1, show_default=True, help="Wanted fraction of steps that trigger.")
@click.option("--n", "n_prompts", default=16, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--nudge-gap", default=DEFAULTS["nudge_gap"], show_default=True)
def calibrate_tau(prompts_file, target_rate, n_prompts, max_tokens, nudge_gap, **o):
    """Choose the entropy threshold tau that fires on about --target-rate of the steps."""
    from .nudge import choose_tau

    try:
        engine = load_engine(o)
        entropies = []
        for i, (_, prompt) in enumerate(read_prompts(prompts_file)[:n_prompts]):
            c = engine.generate(prompt, seed=i, max_tokens=max_tokens, guidance=False)
            entropies.append([r.entropy for r in c.records])
        tau = choose_tau(entropies, target_rate, nudge_gap)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"tau = {tau} (fires on ~{target_rate:.0%} of steps over {sum(map(len, entropies))} steps)")


COMMANDS = [export_group, calibrate_tau]  # registered on `edge-genarm` by cli.py
