"""One training loop for ARMs and reward models: LoRA or full fine-tune, checkpoints, held-out accuracy.

Both learn from preference pairs and differ only in how a micro-batch of pairs is scored (an
`Objective`): an ARM by its summed reply log-probs and the GenARM loss (export/train.py), a
reward model by its score head and the Bradley-Terry loss (export/train_rm.py). The rest is
here, once: the output and tokenizer checks, the seeded held-out split, the step plan, AdamW
with a cosine schedule and checkpoints, held-out evaluation, and the record's figures.

Steps are planned up front from the seed (a permutation per epoch, cut into batches), so a
run resumed from `OUT/checkpoint` sees exactly the batches it would have seen. A batch is
accumulated over micro-batches; each micro-batch is one forward of its chosen and rejected
sequences. The trainers: export/train_arm.py and export/train_rm.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_genarm.export.train import encode_pairs, load_pairs

from edge_genarm.errors import ConfigError

LORA_TARGETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],  # the GenARM reference recipe
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class Objective:
    """How one kind of model scores a micro-batch of encoded pairs: the only thing ARM and
    reward-model training do differently."""

    loss: Callable  # pairs -> (per-pair loss tensor, per-pair r_w > r_l), with gradients
    margin: Callable  # pairs -> per-pair held-out margin tensor; > 0 is a pair ranked right


def check_base_tokens(weights: str | Path, tok, name: str) -> None:
    """Refuse an init tokenizer whose ids differ from the base's; adopt the base's chat template."""
    from edge_genarm.export.onnx_export import tokens_from_hf_tokenizer

    from edge_genarm.bundle import Bundle
    from edge_genarm.gguf import read_gguf
    from edge_genarm.tokens import check_arm_tokens

    bundle = Bundle.open(weights, verify=False)
    info = read_gguf(bundle.base_path)
    check_arm_tokens(name, tokens_from_hf_tokenizer(tok), info.tokens, bundle.base_path.name)
    template = bundle.chat_template or info.get("tokenizer.chat_template")
    if template:  # the runtime formats prompts with this one: train on the same text
        tok.chat_template = template


def prepare_model(
    init: str | Path,
    layers: int | None,
    lora_r: int | None,
    device,
    targets: str = "attn",
    lora_layers: int | None = None,
):
    """(model, tokenizer): float32, cut to `layers`, wrapped in LoRA (r, alpha 2r) unless full.

    `lora_layers` N puts the adapters on the last N decoder layers only: backward then
    stops there, so a step costs about a forward plus 2N/L of the backward.
    """
    from edge_genarm.export.sources import load_source

    model, tok = load_source(init, layers)
    if not tok.chat_template:
        from edge_genarm.export.sources import RAW_TEMPLATE

        tok.chat_template = RAW_TEMPLATE  # what the runtime sends a model without a template
    model.config.use_cache = False
    if lora_r:
        from peft import LoraConfig, get_peft_model

        n = model.config.num_hidden_layers
        if lora_layers is not None and not 1 <= lora_layers <= n:
            raise ConfigError(
                f"--lora-layers must be between 1 and the model's {n} layers, got {lora_layers}"
            )
        top = list(range(n - lora_layers, n)) if lora_layers else None
        cfg = LoraConfig(
            r=lora_r,
            lora_alpha=2 * lora_r,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS[targets],
            layers_to_transform=top,
        )
        model = get_peft_model(model, cfg)
    return model.to(device), tok


def split(n: int, eval_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded shuffle, round(eval_frac * n) held out (at least 1 if > 0)."""
    import random

    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = min(n - 1, max(1, round(eval_frac * n))) if eval_frac > 0 and n > 1 else 0
    return idx[k:], idx[:k]


def step_plan(n: int, batch: int, epochs: int, seed: int) -> list[list[int]]:
    """Batches of positions into the train set: one seeded permutation per epoch, concatenated."""
    import random

    order = []
    for e in range(epochs):
        perm = list(range(n))
        random.Random(seed * 7919 + e).shuffle(perm)
        order += perm
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def evaluate(model, enc: list[tuple], margin: Callable, micro: int) -> dict:
    """Held-out preference accuracy (share of pairs whose `margin` is > 0) and mean margin, e.g.
    r_w - r_l in nats (an ARM trained relative to its init: beyond the init's margin)."""
    import torch

    if not enc:
        return {"n": 0, "accuracy": None, "margin": None}
    was = model.training
    model.eval()
    wins, margins = 0, []
    with torch.no_grad():
        for i in range(0, len(enc), micro):
            m = margin(enc[i : i + micro])
            wins += int((m > 0).sum())
            margins += m.tolist()
    model.train(was)
    return {"n": len(enc), "accuracy": wins / len(enc), "margin": sum(margins) / len(margins)}


# ---------------------------------------------------------------------------
# checkpoints: trainable weights + optimizer + scheduler + step, written atomically
# ---------------------------------------------------------------------------


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(out: Path, model, opt, sched, step: int, key: str, running: dict) -> None:
    import torch

    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": step, "key": key, "trainable": trainable, "running": running}
    state.update(optim=opt.state_dict(), sched=sched.state_dict())
    tmp = ckpt / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt / "state.pt")


def load_checkpoint(out: Path, model, opt, sched, key: str) -> tuple[int, dict]:
    """(step, running stats) restored from OUT/checkpoint, or (0, {}) when there is none."""
    import torch

    path = out / "checkpoint" / "state.pt"
    if not path.is_file():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("key") != key:
        raise ConfigError(
            f"'{path.parent}' is a checkpoint of a run with other settings or data: remove it to "
            "start over, or choose another -o"
        )
    missing = set(state["trainable"]) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ConfigError(f"'{path}' does not fit this model ({sorted(missing)[:3]}...): remove it")
    model.load_state_dict(state["trainable"], strict=False)
    opt.load_state_dict(state["optim"])
    sched.load_state_dict(state["sched"])
    print(f"resuming from {path} at step {state['step']}", file=sys.stderr)
    return state["step"], state.get("running", {})


# ---------------------------------------------------------------------------
# the run: start, fit, record
# ---------------------------------------------------------------------------


def data_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass
class Run:
    """One training run's pair file, output folder and device, and the counts its record reports."""

    data: Path
    out: Path
    device: object  # a torch.device
    pairs: list
    stats: dict  # bad lines, truncated and skipped pairs, as load_pairs and encode_pairs count them
    t0: float = 0.0  # set when training starts: the record's "seconds"

    def encode(self, tok, weights, max_len: int, on_long: str, chat_template: str | None = None):
        """(encoded pairs, pad id); first, with `weights` (a bundle), refuse an init whose
        tokenizer differs from the bundle's base. `chat_template` renders the prompts, over the
        bundle's and the init's."""
        if weights:
            check_base_tokens(weights, tok, self.out.name)
        if chat_template:
            tok.chat_template = chat_template
        enc = encode_pairs(tok, self.pairs, max_len, on_long, self.stats)
        return enc, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def record(self, **extra) -> dict:
        """The end of a run's record: what encoding dropped, `extra`, time taken and device."""
        return {
            "truncated": self.stats.get("truncated", 0), "skipped_long": self.stats.get("skipped_long", 0),
            **extra,
            "bad_lines": self.stats.get("bad_lines", 0), "seconds": round(time.time() - self.t0, 1),
            "device": str(self.device),
        }  # fmt: skip


def start_run(data, out, info_file: str, what: str, force: bool, device: str | None, on_error: str) -> Run:
    """Refuse an `out` that holds a finished run (`info_file`) unless `force`; pick the device; read the pairs."""
    import torch

    data, out = Path(data), Path(out)
    if (out / info_file).is_file() and not force:
        raise ConfigError(f"'{out}' already holds a trained {what}: choose another -o, or --force to retrain")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stats: dict = {}
    return Run(data, out, device, load_pairs(data, on_error, stats), stats)


def fit(
    run: Run, model, enc, objective: Objective, settings: dict, *, lr, epochs, batch_size, micro, eval_frac,
    seed, save_every, progress, desc,
) -> tuple[dict, list[tuple]]:  # fmt: skip
    """Train `model` on the seeded train part of `enc`, evaluating the held-out part before, at each
    epoch's end and after. Returns (the record's figures, n_pairs to epochs; the held-out pairs)."""
    tr, ho = split(len(enc), eval_frac, seed)
    train_enc, eval_enc = [enc[i] for i in tr], [enc[i] for i in ho]
    plan = step_plan(len(train_enc), batch_size, epochs, seed)
    run.t0 = time.time()
    before = evaluate(model, eval_enc, objective.margin, micro)
    curve: list[dict] = []  # held-out {step, accuracy, margin} at each epoch's end
    losses = run_steps(
        objective.loss, model, train_enc, plan, run.out, settings, lr, micro, save_every, progress, desc,
        eval_at={round(len(plan) * (e + 1) / epochs) for e in range(epochs - 1)},
        on_eval=lambda step: _log_eval(curve, step, evaluate(model, eval_enc, objective.margin, micro)),
    )  # fmt: skip
    after = evaluate(model, eval_enc, objective.margin, micro)
    figures = {
        "n_pairs": len(enc), "n_train": len(train_enc), "n_heldout": len(eval_enc),
        "heldout_accuracy": after["accuracy"], "heldout_margin": after["margin"],
        "heldout_accuracy_before": before["accuracy"], "heldout_margin_before": before["margin"],
        "heldout_curve": curve,
        "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None,
        "steps": len(plan), "epochs": epochs,
    }  # fmt: skip
    return figures, eval_enc


def _log_eval(curve: list, step: int, ev: dict) -> None:
    curve.append({"step": step, "accuracy": ev["accuracy"], "margin": ev["margin"]})
    if ev["n"]:
        print(
            f"\nstep {step}: held-out accuracy {ev['accuracy']:.3f}, margin {ev['margin']:+.2f}",
            file=sys.stderr,
        )


def run_steps(
    loss_fn, model, enc, plan, out, settings, lr, micro, save_every, progress, desc="train", eval_at=(),
    on_eval=None,
) -> list[float]:  # fmt: skip
    """AdamW + cosine schedule over `plan`, each batch's loss from `loss_fn` (see `accumulate`);
    checkpoints every `save_every` steps; resumes from a checkpoint of the same `settings`.

    `on_eval(step)` runs after each step number in `eval_at` (held-out accuracy per epoch).

    Returns the batch loss of each step run here (after a resume: from the resumed step).
    """
    import torch
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(0, len(plan) // 20), len(plan))
    key = settings_key(settings)
    start, running = load_checkpoint(out, model, opt, sched, key)
    wins = deque(running.get("wins", []), maxlen=64)
    loss_ema = running.get("loss_ema")
    model.train()
    losses = []
    bar = tqdm(range(start, len(plan)), desc=desc, unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        loss, batch_wins = accumulate(loss_fn, [enc[i] for i in plan[step]], micro)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        wins.extend(batch_wins)
        losses.append(loss)
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        bar.set_postfix(loss=f"{loss_ema:.4f}", acc=f"{sum(wins) / len(wins):.2f}")
        if on_eval and step + 1 in eval_at:
            on_eval(step + 1)
        if save_every and (step + 1) % save_every == 0 and step + 1 < len(plan):
            save_checkpoint(out, model, opt, sched, step + 1, key, {"wins": list(wins), "loss_ema": loss_ema})
    bar.close()
    return losses


def accumulate(loss_fn, batch, micro) -> tuple[float, list[bool]]:
    """Gradients of the batch-mean loss, accumulated over micro-batches; (loss, r_w > r_l per pair).
    `loss_fn(pairs)` gives each pair's loss and whether the model ranks it right."""
    total, wins = 0.0, []
    for i in range(0, len(batch), micro):
        per_pair, right = loss_fn(batch[i : i + micro])
        loss = per_pair.sum() / len(batch)
        loss.backward()
        total += loss.item()
        wins += right.tolist()
    return total, wins
