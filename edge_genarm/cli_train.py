"""`edge-genarm prefs | train-arm | train-rm`: preference pairs from local judges, models from pairs.

Training (edge_genarm/export/, torch) is imported only when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_common import default_weights, fail
from .distributed import ray_options, runner_from_options
from .errors import EdgeGenarmError
from .judges import make_judge
from .records import read_prompts


@click.command()
@click.option(
    "--weights", "-m", help="Bundle folder or .gguf to sample from (default: SmolLM2-135M-Instruct)."
)
@click.option(
    "--prompts", required=True, type=click.Path(exists=True, dir_okay=False), help='JSONL of {"prompt": ...}.'
)
@click.option(
    "--judge",
    required=True,
    help="sentiment | afinn | length | tokens | regex:PATTERN | keyword:a,b,c | python:MODULE:FUNCTION "
    "(higher is better; length counts words, tokens counts the base's tokens).",
)
@click.option("-k", default=2, show_default=True, help="Responses sampled per prompt (best vs worst kept).")
@click.option(
    "-o", "--out", required=True, type=click.Path(dir_okay=False), help="Pairs JSONL (appended, resumable)."
)
@click.option("--max-tokens", "-n", default=64, show_default=True)
@click.option("--temperature", "--temp", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", type=int, help="Use only the first N prompts.")
@click.option("--skip", default=0, show_default=True, help="Skip the first N prompts (keep a held-out part).")
@click.option(
    "--require-finished",
    is_flag=True,
    help="Keep a pair only when the chosen reply ended by itself (EOS), not at --max-tokens.",
)
@click.option("--on-error", default="skip", show_default=True, type=click.Choice(["skip", "stop"]))
@click.option("--ctx", default=2048, show_default=True, help="Context length in tokens.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False),
              help="A Jinja chat template file overriding the model's (train-arm takes the same file).")
@ray_options
def prefs(weights, prompts, judge, k, out, max_tokens, temperature, seed, limit, skip, require_finished,
          on_error, ctx, chat_template, **ro):  # fmt: skip
    """Sample k responses per prompt from the base, judge them, write (chosen, rejected) pairs."""
    from edge_genarm.export.prefs import make_pairs

    from .loader import load
    from .options import LoadOptions

    try:
        if judge != "tokens":
            make_judge(judge)  # a bad spec fails before any model loads
        spec = LoadOptions(
            weights or default_weights(), arms=(), n_ctx=ctx, chat_template=Path(chat_template) if chat_template else None
        ).portable()
        runner = runner_from_options(ro, spec)
        items = read_prompts(prompts, on_error)[skip:][:limit]
        engine = fn = None
        if runner is None:
            engine = load(spec)
            fn = make_judge(judge, tokenize=lambda s: engine.base.tokenize(s, add_bos=False, special=False))
        stats = make_pairs(
            engine, items, fn, judge, out, k, seed, max_tokens, temperature, on_error,
            require_finished=require_finished, runner=runner,
        )  # fmt: skip
    except EdgeGenarmError as e:
        fail(e)
    click.echo(json.dumps(stats))


@click.command("train-arm")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Pairs JSONL.")
@click.option(
    "--init", "init", required=True, type=click.Path(exists=True), help="HF folder or the base .gguf."
)
@click.option(
    "-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (HF checkpoint)."
)
@click.option("--beta-r", default=0.05, show_default=True, type=float)
@click.option(
    "--lora", "lora_r", default=8, show_default=True, help="LoRA rank (alpha 2r, attention projections)."
)
@click.option("--full", is_flag=True, help="Full fine-tune instead of LoRA.")
@click.option("--layers", type=int, help="Keep only the first N decoder layers (a smaller ARM).")
@click.option("--lr", type=float, help="Learning rate (default 5e-4 LoRA, 1e-5 full).")
@click.option("--epochs", default=1, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="Pairs per optimizer step.")
@click.option(
    "--micro-batch", default=4, show_default=True, help="Pairs per forward (gradient accumulation)."
)
@click.option("--max-len", default=512, show_default=True, help="Max tokens per sequence.")
@click.option("--on-long", default="truncate", show_default=True, type=click.Choice(["truncate", "skip"]))
@click.option("--on-error", default="stop", show_default=True, type=click.Choice(["skip", "stop"]))
@click.option("--eval-frac", default=0.1, show_default=True, help="Held-out share of the pairs.")
@click.option("--seed", default=0, show_default=True)
@click.option("--save-every", default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--weights", "-m", help="The base bundle or .gguf: refuse an init with other token ids.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Default: cuda when available.")
@click.option("--force", is_flag=True, help="Retrain over a finished ARM in -o.")
@click.option(
    "--lora-targets",
    type=click.Choice(["attn", "all"]),
    default="attn",
    show_default=True,
    help="LoRA on attention projections, or on all linear layers (attention + MLP).",
)
@click.option(
    "--lora-layers",
    type=int,
    help="LoRA on the last N decoder layers only (faster: backward stops there). Default: all.",
)
@click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False),
    help="A Jinja chat template file the pairs are rendered with (as prefs and the runtime were given it); "
    "default: the --weights bundle's, else the init's, else the raw prompt.",
)
@click.option(
    "--reference",
    is_flag=True,
    help="Score replies relative to the init (r - r_init, DPO's reference term; LoRA only). For a "
    "judge the init already agrees with, e.g. shorter replies, the plain loss has nothing to learn.",
)
def train_arm_cmd(lora_r, full, **o):
    """Train a GenARM reward model: L = -log sigmoid(beta_r * (r(x,y_w) - r(x,y_l)))."""
    from edge_genarm.export.train_arm import train_arm

    from .chat import read_template

    try:
        if o["chat_template"]:
            o["chat_template"] = read_template(o["chat_template"])
        info = train_arm(lora_r=None if full else lora_r, **o)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(json.dumps(info, indent=2))


@click.command("train-rm")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Pairs JSONL.")
@click.option(
    "--init", "init", required=True, type=click.Path(exists=True), help="HF folder or the base .gguf."
)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--lora", "lora_r", default=16, show_default=True, help="LoRA rank (alpha 2r).")
@click.option("--lora-layers", default=8, show_default=True, help="LoRA on the last N decoder layers.")
@click.option("--lora-targets", type=click.Choice(["attn", "all"]), default="all", show_default=True)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--epochs", default=1, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Pairs per optimizer step.")
@click.option("--micro-batch", default=8, show_default=True, help="Pairs per forward.")
@click.option("--max-len", default=512, show_default=True, help="Max tokens per sequence.")
@click.option("--on-long", default="truncate", show_default=True, type=click.Choice(["truncate", "skip"]))
@click.option("--on-error", default="stop", show_default=True, type=click.Choice(["skip", "stop"]))
@click.option("--eval-frac", default=0.1, show_default=True, help="Held-out share of the pairs (seeded).")
@click.option("--seed", default=0, show_default=True)
@click.option("--save-every", default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--weights", "-m", help="The base bundle or .gguf: refuse an init with other token ids.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Default: cuda when available.")
@click.option("--force", is_flag=True, help="Retrain over a finished reward model in -o.")
def train_rm_cmd(**o):
    """Train a reward model for Best-of-N / ARGS: base + LoRA + score head, L = -log sigmoid(r_w - r_l)."""
    from edge_genarm.export.train_rm import train_rm

    try:
        info = train_rm(**o)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(json.dumps(info, indent=2))




@click.command("train-mix")
@click.option("--recipe", "pack", default="default", show_default=True,
              help="The pack whose ARMs' pairs and settings the head learns (models/NAME-pack/recipe.toml).")  # fmt: skip
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--objective", "objectives", multiple=True, help="An ARM of the recipe to include (default: all).")
@click.option("--layers", default=4, show_default=True, help="The head: the base's last N layers.")
@click.option("--lora", "rank", default=16, show_default=True, help="LoRA rank per objective (alpha 2r).")
@click.option("--epochs", default=2, show_default=True)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--batch-size", default=8, show_default=True, help="Pairs per objective per step.")
@click.option("--micro-batch", default=8, show_default=True, help="Pairs per forward.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", type=int, help="torch threads (default: torch's).")
@click.option("--distill", is_flag=True,
              help="Learn the recipe's own ARMs' mixture (their committed adapters) on the base's likeliest "
                   "tokens at every reply position, instead of the GenARM loss on the pairs.")  # fmt: skip
@click.option("--candidates", default=128, show_default=True, help="With --distill: the base's likeliest tokens scored.")
def train_mix_cmd(pack, out, objectives, distill, **o):
    """Train one head for every weight vector of a pack's objectives (the fast mode's mix head):
    a gated LoRA per objective on the base's last layers, trained at random mixes."""
    from edge_genarm.export.train_mix import ObjectiveData, train_mix

    from .pack import fetch_base, load_recipe, recipe_template

    try:
        recipe = load_recipe(pack)
        names = list(objectives) or list(recipe["arms"])
        specs = []
        for n in names:
            if n not in recipe["arms"]:
                raise EdgeGenarmError(f"the recipe of pack '{pack}' has no ARM '{n}' (it has {', '.join(recipe['arms'])})")
            a = recipe["arms"][n]
            specs.append(ObjectiveData(n, recipe["_dir"] / a["data"], a.get("beta_r", 0.05), bool(a.get("reference")),
                                       a.get("max_len", 512), a.get("eval_frac", 0.15)))  # fmt: skip
        if distill:
            o["distill"] = {n: recipe["_dir"] / recipe["arms"][n]["adapter"] for n in names}
        gguf = fetch_base(recipe["base"], log=lambda m: click.echo(m, err=True))
        info = train_mix(specs, gguf, out, chat_template=recipe_template(recipe), log=lambda m: click.echo(m, err=True), **o)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(json.dumps({k: info[k] for k in ("objectives", "held_out", "held_out_init", "seconds")}, indent=2))


COMMANDS = [prefs, train_arm_cmd, train_rm_cmd, train_mix_cmd]  # registered on `edge-genarm` by cli.py
