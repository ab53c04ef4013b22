"""The command line: `edge-genarm generate | chat | bench`. No math lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .distributed import ray_options, runner_from_options, spec_from_options
from .errors import EdgeGenarmError
from .guidance import GUIDED_DRY, SamplingParams
from .judges import make_judge
from .nudge import NudgeConfig
from .records import DataError, read_prompts

_D = SamplingParams()  # the one home of the sampling defaults
_N = NudgeConfig()


def default_weights() -> str:
    """No --weights: the default pack (built on first use), else the bare SmolLM2 GGUF."""
    from .pack import build_pack_quietly, built_bundle

    bundle = built_bundle("default")
    if bundle is not None:
        return str(bundle)
    try:
        import peft  # noqa: F401  (the pack trains its ARMs: needs the train extra)
        import torch  # noqa: F401
    except ImportError:
        click.echo(
            "note: the default pack needs the train extra to build (pip install "
            "'edge-genarm[train]'); using the bare SmolLM2 base without ARMs",
            err=True,
        )
        try:
            from .pack import fetch_base, load_recipe

            return str(fetch_base(load_recipe("default")["base"], log=lambda m: click.echo(m, err=True)))
        except EdgeGenarmError as e:
            fail(e)
    click.echo(
        "first run: building the default pack (SmolLM2-135M + ARMs) into the cache; later runs start at once "
        "(`edge-genarm pack build -v` shows every detail)",
        err=True,
    )
    try:
        return str(build_pack_quietly("default"))
    except EdgeGenarmError as e:
        fail(e)


def weights_or_default(weights: str | None) -> str:
    """--weights as given, or the default pack when it is left out; an empty value is an error."""
    if weights is None:
        return default_weights()
    if not weights.strip():
        raise EdgeGenarmError(
            "--weights is empty: give a bundle folder or a .gguf file, or leave it out for the default pack"
        )
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


def model_options(f):
    opts = [
        click.option("--weights", "-m", help="Bundle folder or .gguf file (default: SmolLM2-135M-Instruct)."),
        click.option(
            "--arm",
            "arms",
            multiple=True,
            metavar="NAME=W",
            help="ARM and weight, repeatable: a bundle name or a path to an .onnx file.",
        ),
        click.option("--no-guidance", is_flag=True, help="Sample from the base alone (A/B)."),
        click.option("--ctx", default=4096, show_default=True, help="Context length in tokens."),
        click.option("--threads", type=int, help="llama.cpp threads (default: the cores)."),
        click.option(
            "--gpu-layers", default=0, show_default=True, help="Base layers offloaded to the GPU (-1: all)."
        ),
        click.option(
            "--arm-device",
            default="cpu",
            show_default=True,
            type=click.Choice(["auto", "cpu", "cuda", "coreml"]),
            help="onnxruntime device for ARMs.",
        ),
        click.option("--arm-threads", type=int, help="onnxruntime threads per ARM (default: by --parallel)."),
        click.option(
            "--parallel/--sequential",
            default=None,
            help="Overlap base and ARM forwards in threads, splitting the cores (default: by model sizes).",
        ),
        click.option(
            "--chat-template",
            type=click.Path(exists=True, dir_okay=False),
            help="A Jinja chat template file overriding the model's.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def sampling_options(f):
    opts = [
        click.option("--temperature", "--temp", default=_D.temperature, show_default=True, type=float),
        click.option("--top-k", default=_D.top_k, show_default=True, type=int, help="0 disables."),
        click.option("--top-p", default=_D.top_p, show_default=True, type=float, help="1 disables."),
        click.option("--min-p", default=_D.min_p, show_default=True, type=float, help="0 disables."),
        click.option(
            "--repeat-penalty",
            default=_D.repeat_penalty,
            show_default=True,
            type=float,
            help="llama.cpp's repeat penalty over the last --repeat-last-n tokens (1.0: off; Ollama uses 1.1).",
        ),
        click.option("--repeat-last-n", default=_D.repeat_last_n, show_default=True, type=int),
        click.option(
            "--dry-multiplier",
            "--dry",
            type=float,
            help="DRY repetition penalty strength (0: off). Default: auto, "
            f"{GUIDED_DRY} when an ARM is active (guided replies loop without it), else off.",
        ),
        click.option("--seed", type=int, help="Seed for reproducible output."),
        click.option(
            "--max-tokens", "-n", default=256, show_default=True, help="Tokens to generate at most."
        ),
        click.option("--stop", multiple=True, help="Stop string, repeatable."),
        click.option("--system", "-s", help="System prompt."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def load_engine(o: dict):
    from .loader import load

    template = Path(o["chat_template"]) if o.get("chat_template") else None  # read (and checked) by load
    return load(
        weights_or_default(o["weights"]),
        list(o["arms"]) or None,
        n_ctx=o["ctx"],
        threads=o["threads"],
        gpu_layers=o["gpu_layers"],
        arm_device=o["arm_device"],
        arm_threads=o["arm_threads"],
        parallel=o["parallel"],
        chat_template=template,
    )


def nudge_options(f):
    opts = [
        click.option("--nudge", is_flag=True, help="Entropy-triggered nudging (GGRO, edge variant)."),
        click.option(
            "--nudge-tau", default=_N.tau, show_default=True, type=float, help="Entropy trigger (nats)."
        ),
        click.option(
            "--nudge-gap", default=_N.min_gap, show_default=True, type=int, help="Min tokens between sites."
        ),
        click.option(
            "--nudge-k", default=_N.top_k, show_default=True, type=int, help="Base top-K candidates."
        ),
        click.option(
            "--nudge-mode", default=_N.mode, show_default=True, type=click.Choice(["force", "bias"])
        ),
        click.option("--nudge-strength", default=_N.strength, show_default=True, type=float),
        click.option(
            "--nudge-rollouts",
            default=_N.rollouts,
            show_default=True,
            type=int,
            help="Verify this many candidates per site by rolling them out (needs ARMs; 0: off).",
        ),
        click.option(
            "--nudge-rollout-len", default=_N.rollout_len, show_default=True, type=int, help="Rollout tokens."
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def nudge_config(o: dict) -> NudgeConfig | None:
    if not o.get("nudge"):
        return None
    return NudgeConfig(
        tau=o["nudge_tau"],
        min_gap=o["nudge_gap"],
        top_k=o["nudge_k"],
        mode=o["nudge_mode"],
        strength=o["nudge_strength"],
        rollouts=o["nudge_rollouts"],
        rollout_len=o["nudge_rollout_len"],
    )


def gen_kwargs(o: dict) -> dict:
    return dict(
        sampling=SamplingParams(
            o["temperature"], o["top_k"], o["top_p"], o["min_p"], o["repeat_penalty"], o["repeat_last_n"],
            dry_multiplier=o.get("dry_multiplier"),
        ),  # fmt: skip
        seed=o["seed"],
        max_tokens=o["max_tokens"],
        stop=list(o["stop"]),
        guidance=not o["no_guidance"],
        system=o["system"],
        nudge=nudge_config(o),
    )


def fail(e: Exception):
    raise click.ClickException(str(e)) from None


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


@main.command()
@click.argument("prompt", required=False)
@model_options
@sampling_options
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text, records and timings.")
@click.option("--no-stream", is_flag=True, help="Print the text when done.")
@nudge_options
@click.option("--explain", is_flag=True, help="Mark nudged tokens «new|was» and list what nudging did.")
def generate(prompt, raw, as_json, no_stream, explain, **o):
    """Generate a reply to PROMPT (or to standard input when PROMPT is absent or '-')."""
    prompt = prompt_text(prompt)
    try:
        engine = load_engine(o)
        kw = gen_kwargs(o)
        if explain:
            click.echo(explain_text(engine, engine.generate(prompt, raw=raw, **kw)))
            return
        if as_json or no_stream:
            c = engine.generate(prompt, raw=raw, **kw)
            if as_json:
                click.echo(json.dumps(completion_json(c, engine)))
            else:
                click.echo(c.text)
            return
        gen = engine.stream(prompt, raw=raw, **kw)
        for rec in gen:
            click.echo(rec.text, nl=False)
        click.echo()
        s = gen.timings.summary()
        click.echo(f"[{s['tokens']} tokens, {s['tok_per_s']:.1f} tok/s]", err=True)
    except EdgeGenarmError as e:
        fail(e)


def explain_text(engine, c) -> str:
    """The reply with nudged tokens marked «new|was», then the nudge summary."""
    piece = engine.base.token_bytes
    parts = []
    for r in c.records:
        if r.nudged_from is not None:
            was = piece(r.nudged_from).decode("utf-8", "replace")
            parts.append(f"«{r.text}|{was}»")
        else:
            parts.append(r.text)
    out = "".join(parts)
    if c.nudge is not None:
        s = c.nudge.summary()
        out += (
            f"\n[nudge: {s['sites']} sites in {s['steps']} steps ({s['trigger_rate']:.0%}), "
            f"{s['changed']} changed the token]"
        )
    return out


def completion_json(c, engine) -> dict:
    return {
        "text": c.text,
        "finish_reason": c.finish_reason,
        "tokens": c.tokens,
        "weights": c.weights,
        "timings": c.timings.summary(),
        "nudge": None if c.nudge is None else {**c.nudge.summary(), "changes": c.nudge.changes},
        "records": [
            dict(
                token=r.token,
                text=r.text,
                base_logprob=r.base_logprob,
                combined_logprob=r.combined_logprob,
                entropy=r.entropy,
                arm_contrib=r.arm_contrib,
                fallback=r.fallback,
                site=r.site,
                nudged_from=r.nudged_from,
            )
            for r in c.records
        ],
    }


@main.command()
@model_options
@sampling_options
@nudge_options
def chat(**o):
    """A streaming chat REPL. /help lists the commands."""
    from concurrent.futures import ThreadPoolExecutor

    from .repl import run_repl

    try:
        o = {**o, "weights": weights_or_default(o["weights"])}  # a first-run pack build: in the foreground
    except EdgeGenarmError as e:
        fail(e)
    # The models load while the prompt is already up: typing the first message overlaps
    # the seconds ORT spends creating ARM sessions. The first reply waits for them.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
    pending = pool.submit(load_engine, o)
    pool.shutdown(wait=False)
    try:
        run_repl(pending, gen_kwargs(o))
    except EdgeGenarmError as e:
        fail(e)


@main.command()
@model_options
@click.option("--prompt", default="Write a short story about a lighthouse keeper.", show_default=True)
@click.option("--max-tokens", "-n", default=128, show_default=True)
@click.option("--repeats", default=2, show_default=True, help="Runs per mode; the best is reported.")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--record", is_flag=True, help="Save the faster placement (sequential/overlapped) in the bundle."
)
def bench(prompt, max_tokens, repeats, as_json, record, **o):
    """Tokens/s unguided vs guided, ms per step for each part, peak RSS, disk."""
    from .bench import format_report, record_placement, run_bench

    try:
        report = run_bench(
            lambda parallel: load_engine({**o, "parallel": parallel}), prompt, max_tokens, repeats
        )
        if record:
            rec = record_placement(o.get("weights") or default_weights(), report)
            report["recorded"] = rec
    except EdgeGenarmError as e:
        fail(e)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if record and report.get("recorded"):
        click.echo(
            f"recorded: {'overlapped' if report['recorded']['parallel'] else 'sequential'} for these ARMs"
        )


# ---------------------------------------------------------------------------
# export and bundle commands: the heavy tooling is imported only when they run
# ---------------------------------------------------------------------------


@main.group("export")
def export_group():
    """Build bundles: base -> GGUF, ARM -> ONNX, each checked against its source."""


@export_group.command("base")
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(), help="Bundle folder.")
@click.option("--quant", default="f16", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0"]))
@click.option("--force", is_flag=True, help="Redo / replace an existing export.")
def export_base_cmd(source, out, quant, force):
    """SOURCE: a Hugging Face folder (converted by llama.cpp's converter) or a .gguf (adopted)."""
    from edge_genarm.export.commands import export_base

    try:
        export_base(source, out, quant, force)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"base written to {out}")


def quantize_options(f):
    """--quantize and the gate's held-out pairs (the same split train-arm held out)."""
    opts = [
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
    ]  # fmt: skip
    for o in reversed(opts):
        f = o(f)
    return f


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
@click.option("--accuracy-level", default=4, show_default=True, help="MatMulNBits compute: 4 = int8 activations.")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False),
              help="Pairs it was trained on (default: the file train-rm recorded); gates --quantize.")
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
@quantize_options
def export_share_cmd(bundle, arms, quantize, block_size, accuracy_level, **o):
    """Put sibling ARMs (one init, adapters on the last layers) on one shared trunk and LM head."""
    from edge_genarm.export.share import share_trunk

    try:
        m = share_trunk(bundle, list(arms) or None, quantize, block_size, accuracy_level, pair_specs(o, arms))
    except EdgeGenarmError as e:
        fail(e)
    shared = [n for n, a in m["arms"].items() if "trunk" in a]
    click.echo(f"ARMs {', '.join(shared)} of {bundle} now share one trunk")


@main.group("bundle")
def bundle_group():
    """Look inside bundles."""


@bundle_group.command("inspect")
@click.argument("path", type=click.Path(exists=True))
def bundle_inspect(path):
    """Models, sizes, vocab, chat template, ARMs, weights, beta_r, hashes, parity."""
    from edge_genarm.export.commands import inspect_bundle

    try:
        click.echo(inspect_bundle(path))
    except EdgeGenarmError as e:
        fail(e)


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
    default=NudgeConfig().tau,
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


@main.command("calibrate-tau")
@model_options
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--target-rate", default=0.1, show_default=True, help="Wanted fraction of steps that trigger.")
@click.option("--n", "n_prompts", default=16, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--nudge-gap", default=NudgeConfig().min_gap, show_default=True)
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


# ---------------------------------------------------------------------------
# training commands: preference pairs from local judges, ARMs from pairs
# ---------------------------------------------------------------------------


@main.command()
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
@ray_options
def prefs(weights, prompts, judge, k, out, max_tokens, temperature, seed, limit, skip, require_finished,
          on_error, ctx, **ro):  # fmt: skip
    """Sample k responses per prompt from the base, judge them, write (chosen, rejected) pairs."""
    from edge_genarm.export.prefs import make_pairs

    from .distributed import LoadSpec

    try:
        if judge != "tokens":
            make_judge(judge)  # a bad spec fails before any model loads
        spec = LoadSpec(str(Path(weights or default_weights()).expanduser().resolve()), arms=(), n_ctx=ctx)
        runner = runner_from_options(ro, spec)
        items = read_prompts(prompts, on_error)[skip:][:limit]
        engine = fn = None
        if runner is None:
            engine = spec.load()
            fn = make_judge(judge, tokenize=lambda s: engine.base.tokenize(s, add_bos=False, special=False))
        stats = make_pairs(
            engine, items, fn, judge, out, k, seed, max_tokens, temperature, on_error,
            require_finished=require_finished, runner=runner,
        )  # fmt: skip
    except EdgeGenarmError as e:
        fail(e)
    click.echo(json.dumps(stats))


@main.command("train-arm")
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
def train_arm_cmd(lora_r, full, **o):
    """Train a GenARM reward model: L = -log sigmoid(beta_r * (r(x,y_w) - r(x,y_l)))."""
    from edge_genarm.export.train_loop import train_arm

    try:
        info = train_arm(lora_r=None if full else lora_r, **o)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(json.dumps(info, indent=2))


@main.command("train-rm")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Pairs JSONL.")
@click.option("--init", "init", required=True, type=click.Path(exists=True), help="HF folder or the base .gguf.")
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


@main.command()
@click.option("--weights", "-m", help="Bundle folder or .gguf file to check (default: the default model).")
@click.option("--arm", "arms", multiple=True, metavar="NAME=W")
def doctor(weights, arms):
    """What this machine runs (llama.cpp backend, onnxruntime providers, threads) and a bundle check."""
    from .doctor import format_checks, run_checks

    checks = run_checks(weights or default_weights(), list(arms) or None)
    click.echo(format_checks(checks))
    if any(not ok for _, ok, _, _ in checks):
        raise SystemExit(1)


@main.command()
@model_options
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--skip", default=0, show_default=True, help="Skip the first N prompts (held-out split).")
@click.option("-n", "n_prompts", default=16, show_default=True, help="Prompts to use.")
@click.option(
    "--setting",
    "settings",
    multiple=True,
    metavar="SPEC",
    help="unguided | NAME=W[,NAME=W] [+nudge], repeatable (default: unguided and each ARM).",
)
@click.option(
    "--judge",
    "judges",
    multiple=True,
    default=("sentiment", "length"),
    show_default=True,
    help="A judge spec as for `prefs`, repeatable.",
)
@click.option("--max-tokens", default=48, show_default=True)
@click.option("--seed", default=0, show_default=True)
@ray_options
def compare(prompts_file, skip, n_prompts, settings, judges, max_tokens, seed, **o):
    """Same prompts and seeds, several guidance settings, judged scores (mean ± s.e.)."""
    from .batch import BatchWork, Progress, local_runner, parse_setting
    from .compare import format_rows, summarize

    try:
        spec = spec_from_options(o, o["weights"] or default_weights())
        runner = runner_from_options(o, spec)
        items = read_prompts(prompts_file)[skip : skip + n_prompts]
        prompts = [p for _, p in items]
        if not prompts:
            raise DataError(f"{prompts_file} has no prompts after --skip {skip}: lower --skip")
        arms = list(spec.arm_weights())
        specs = settings or ["unguided", *[f"{a}=1" for a in arms]]
        parsed = [parse_setting(s, arms) for s in specs]
        work = BatchWork(seed=seed, max_tokens=max_tokens, judges=tuple(judges))
        tasks, records = work.tasks(items, parsed, set()), []
        bar = Progress(len(tasks), "compare")
        try:
            (runner or local_runner(spec.load))(work, tasks, lambda r: (records.append(r), bar.update(1)))
        finally:
            bar.close()
        rows = summarize(records, parsed, list(judges))
    except EdgeGenarmError as e:
        fail(e)
    click.echo(
        f"{len(prompts)} prompts from {prompts_file} (from line {skip + 1}), --seed {seed} (one seed "
        f"per prompt, shared by the settings); judges: {', '.join(judges)}"
    )
    click.echo(format_rows(rows, list(judges)))


@main.group("pack")
def pack_group():
    """The built-in default pack: build, list, remove."""


@pack_group.command("build")
@click.argument("name", default="default")
@click.option("--force", is_flag=True, help="Rebuild from scratch.")
@click.option(
    "--retrain",
    is_flag=True,
    help="Train the ARMs from the recipe's pairs instead of its committed adapters.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show every tool's output, not one line per stage.")
def pack_build(name, force, retrain, verbose):
    """Build pack NAME from its recipe under models/ (resumes an interrupted build)."""
    import time

    from .pack import build_pack_quietly

    t0 = time.time()
    try:
        bundle = build_pack_quietly(name, force, retrain, verbose)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"pack '{name}' ready at {bundle} ({time.time() - t0:.0f} s)")


@pack_group.command("list")
def pack_list():
    from .pack import list_packs

    for p in list_packs():
        click.echo(f"{p['name']:<12} {p['state']:<10} {p['mb']:>8.1f} MB  {p['path']}")


@pack_group.command("rm")
@click.argument("name", default="default")
def pack_rm(name):
    from .pack import remove_pack

    click.echo(f"removed pack '{name}'" if remove_pack(name) else f"pack '{name}' is not built")



# Commands that live in their own modules register themselves on `main` (they use the helpers above).
from . import cli_batch, cli_eval  # noqa: E402, F401
from .server.command import serve_command  # noqa: E402  (edge_genarm/server/)

main.add_command(serve_command(model_options, load_engine))

if __name__ == "__main__":
    from edge_genarm.cli import main as _main  # the imported module: every command is registered on it

    _main()
