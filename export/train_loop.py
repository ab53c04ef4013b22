"""The ARM training loop: LoRA or full fine-tune, checkpoints, held-out preference accuracy.

Steps are planned up front from the seed (a permutation per epoch, cut into
batches), so a run resumed from `OUT/checkpoint` sees exactly the batches it
would have seen. A batch is accumulated over micro-batches; each micro-batch is
one forward of its chosen and rejected sequences. The result is a plain Hugging
Face folder (LoRA merged) plus `edge_genarm_arm.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

from edge_genarm.export.train import (
    check_options,
    encode_pairs,
    genarm_loss,
    load_pairs,
    pair_rewards,
    reference_offsets,
)

from edge_genarm.errors import ConfigError
from edge_genarm.paths import atomic_write_json

ARM_INFO = "edge_genarm_arm.json"
LORA_TARGETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],  # the GenARM reference recipe
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


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
        from edge_genarm.chat import CHATML

        tok.chat_template = CHATML  # what the runtime falls back to
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


def evaluate(model, enc: list[tuple], pad_id: int, device, micro: int) -> dict:
    """Held-out preference accuracy (share of r_w > r_l) and mean margin r_w - r_l (nats);
    with a reference (relative pairs), the margin beyond the reference's."""
    import torch

    if not enc:
        return {"n": 0, "accuracy": None, "margin": None}
    was = model.training
    model.eval()
    wins, margins = 0, []
    with torch.no_grad():
        for i in range(0, len(enc), micro):
            part = enc[i : i + micro]
            r_w, r_l = pair_rewards(model, part, pad_id, device)
            m = r_w - r_l - reference_offsets(part, device)
            wins += int((m > 0).sum())
            margins += m.tolist()
    model.train(was)
    return {"n": len(enc), "accuracy": wins / len(enc), "margin": sum(margins) / len(margins)}


def with_reference(model, enc: list[tuple], pad_id: int, device, micro: int) -> list[tuple]:
    """Each pair + the init model's margin r_ref(y_w) - r_ref(y_l) (LoRA adapters off), so the
    loss scores r - r_ref: DPO's reference term. For a judge the init already agrees with (it
    gives shorter replies a higher summed log-prob), the plain loss starts saturated and has
    nothing to learn; relative to the init it starts at log 2 on every pair."""
    import torch

    out = []
    was = model.training
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        for i in range(0, len(enc), micro):
            part = enc[i : i + micro]
            r_w, r_l = pair_rewards(model, part, pad_id, device)
            out += [(*e[:3], float(m)) for e, m in zip(part, (r_w - r_l).tolist())]
    model.train(was)
    return out


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
# the run
# ---------------------------------------------------------------------------


def data_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def train_arm(
    data: str | Path,
    init: str | Path,
    out: str | Path,
    beta_r: float = 0.05,
    lora_r: int | None = 8,
    layers: int | None = None,
    lr: float | None = None,
    epochs: int = 1,
    batch_size: int = 16,
    micro_batch: int = 4,
    max_len: int = 512,
    on_long: str = "truncate",
    on_error: str = "stop",
    eval_frac: float = 0.1,
    seed: int = 0,
    save_every: int = 50,
    weights: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    force: bool = False,
    lora_targets: str = "attn",
    lora_layers: int | None = None,
    reference: bool = False,
) -> dict:
    """Train an ARM on `data` from `init` into `out`; returns what edge_genarm_arm.json records.

    `reference`: score each reply relative to the init (r - r_init, see `with_reference`)."""
    import torch

    check_options(beta_r, max_len, eval_frac, on_long, on_error)
    if reference and not lora_r:
        raise ConfigError(
            "--reference needs LoRA (the init with its adapters off is the reference): drop --full"
        )
    data, out = Path(data), Path(out)
    if (out / ARM_INFO).is_file() and not force:
        raise ConfigError(f"'{out}' already holds a trained ARM: choose another -o, or --force to retrain")
    lr = lr if lr is not None else (5e-4 if lora_r else 1e-5)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stats: dict = {}
    pairs = load_pairs(data, on_error, stats)
    torch.manual_seed(seed)
    model, tok = prepare_model(init, layers, lora_r, device, lora_targets, lora_layers)
    if weights:
        check_base_tokens(weights, tok, out.name)
    enc = encode_pairs(tok, pairs, max_len, on_long, stats)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if reference:
        enc = with_reference(model, enc, pad, device, micro_batch)
    tr, ho = split(len(enc), eval_frac, seed)
    train_enc, eval_enc = [enc[i] for i in tr], [enc[i] for i in ho]
    settings = dict(data=data_digest(data), init=str(Path(init).resolve()), beta_r=beta_r, lora_r=lora_r)
    settings.update(
        lora_targets=lora_targets,
        lora_layers=lora_layers,
        layers=layers,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        max_len=max_len,
    )
    settings.update(on_long=on_long, eval_frac=eval_frac, seed=seed, n=len(enc))
    if reference:  # only when set: checkpoints of earlier runs keep their key
        settings["reference"] = True
    plan = step_plan(len(train_enc), batch_size, epochs, seed)
    t0 = time.time()
    before = evaluate(model, eval_enc, pad, device, micro_batch)
    curve: list[dict] = []  # held-out {step, accuracy, margin} at each epoch's end
    losses = run_steps(
        model, train_enc, plan, pad, device, out, settings, beta_r, lr, micro_batch, save_every, progress,
        eval_at={round(len(plan) * (e + 1) / epochs) for e in range(epochs - 1)},
        on_eval=lambda step: _log_eval(curve, step, evaluate(model, eval_enc, pad, device, micro_batch)),
    )  # fmt: skip
    after = evaluate(model, eval_enc, pad, device, micro_batch)
    info = {
        "beta_r": beta_r, "data": str(data.resolve()), "init": str(Path(init).resolve()),
        "reward": "relative to the init" if reference else "summed log-prob", "lora_layers": lora_layers,
        "n_pairs": len(enc), "n_train": len(train_enc), "n_heldout": len(eval_enc),
        "heldout_accuracy": after["accuracy"], "heldout_margin": after["margin"],
        "heldout_accuracy_before": before["accuracy"], "heldout_margin_before": before["margin"],
        "heldout_curve": curve,
        "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None,
        "steps": len(plan), "epochs": epochs, "layers": model.config.num_hidden_layers,
        "method": (
            f"lora r={lora_r} ({lora_targets}{f', last {lora_layers} layers' if lora_layers else ''})"
            if lora_r else "full"
        ), "lr": lr, "max_len": max_len,
        "truncated": stats.get("truncated", 0), "skipped_long": stats.get("skipped_long", 0),
        **({"heldout_reference_margins": [e[3] for e in eval_enc]} if reference else {}),
        "bad_lines": stats.get("bad_lines", 0), "seconds": round(time.time() - t0, 1), "device": str(device),
    }  # fmt: skip
    save_arm(model, tok, out, info, bool(lora_r))
    return info


def _log_eval(curve: list, step: int, ev: dict) -> None:
    curve.append({"step": step, "accuracy": ev["accuracy"], "margin": ev["margin"]})
    if ev["n"]:
        print(
            f"\nstep {step}: held-out accuracy {ev['accuracy']:.3f}, margin {ev['margin']:+.2f}",
            file=sys.stderr,
        )


def run_steps(
    model, enc, plan, pad, device, out, settings, beta_r, lr, micro, save_every, progress,
    eval_at=(), on_eval=None,
):  # fmt: skip
    """AdamW + cosine schedule over `plan`; checkpoints every `save_every` steps; resumes.

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
    bar = tqdm(range(start, len(plan)), desc="train-arm", unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        batch = [enc[i] for i in plan[step]]
        loss, batch_wins = accumulate(model, batch, pad, device, beta_r, micro)
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


def accumulate(model, batch, pad, device, beta_r, micro) -> tuple[float, list[bool]]:
    """Gradients of the batch-mean loss, accumulated over micro-batches; (loss, r_w > r_l per pair)."""
    total, wins = 0.0, []
    for i in range(0, len(batch), micro):
        part = batch[i : i + micro]
        r_w, r_l = pair_rewards(model, part, pad, device)
        r_w = r_w - reference_offsets(part, device)
        loss = genarm_loss(r_w, r_l, beta_r).sum() / len(batch)
        loss.backward()
        total += loss.item()
        wins += (r_w > r_l).tolist()
    return total, wins


ADAPTER = "adapter"


def save_adapter(model, dst: Path) -> None:
    """The LoRA adapter alone, in float16 (a few MB: small enough to commit with a recipe)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    part = dst.with_name(dst.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    state = {k: v.detach().to("cpu").half().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, part / "adapter_model.safetensors")
    cfg = model.peft_config["default"]
    cfg.base_model_name_or_path = Path(str(cfg.base_model_name_or_path or "")).name  # no local paths
    cfg.save_pretrained(part)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(part, dst)


def apply_adapter(init: str | Path, adapter: str | Path, out: str | Path, layers: int | None = None) -> Path:
    """The ARM a saved adapter describes: `init` (cut to `layers`) + the adapter, merged, as a HF folder."""
    import torch
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"'{adapter}' is not a LoRA adapter folder (no adapter_config.json): retrain it")
    model, tok = prepare_model(init, layers, None, "cpu")
    with torch.no_grad():
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.config.use_cache = True
    out = Path(out)
    part = out.with_name(out.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part, safe_serialization=True)
    tok.save_pretrained(part)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(part, out)
    return out


def save_arm(model, tok, out: Path, info: dict, merge: bool) -> None:
    """Merge LoRA, save the HF folder beside the checkpoint, then the info file last (completion mark).

    A LoRA run also keeps its adapter in OUT/adapter (float16), which `apply_adapter` turns back
    into the same ARM: the default pack ships adapters made this way.
    """
    if merge:
        save_adapter(model, out / ADAPTER)
        model = model.merge_and_unload()
    model.config.use_cache = True
    part = out / ".model.partial"
    shutil.rmtree(part, ignore_errors=True)
    model.to("cpu").save_pretrained(part, safe_serialization=True)
    tok.save_pretrained(part)
    for f in part.iterdir():
        os.replace(f, out / f.name)
    part.rmdir()
    atomic_write_json(out / ARM_INFO, info)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    acc = info["heldout_accuracy"]
    print(
        f"ARM saved to {out}: {info['steps']} steps, held-out accuracy "
        f"{'n/a' if acc is None else f'{acc:.3f}'} (before {info['heldout_accuracy_before']}) "
        f"on {info['n_heldout']} pairs, margin {info['heldout_margin']}",
        file=sys.stderr,
    )
