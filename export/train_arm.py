"""`edge-genarm train-arm`: an ARM trained on preference pairs, saved as a Hugging Face folder.

The objective is GenARM's (export/train.py): the reward of a reply is its summed log-prob
under the ARM, optionally relative to the init's (`reference`); the loop, checkpoints and
held-out figures are the shared ones (export/train_loop.py). The result is a plain Hugging
Face folder (LoRA merged) plus `edge_genarm_arm.json`, and for a LoRA run its adapter alone
in OUT/adapter (what the packs commit; `apply_adapter` turns it back into the ARM).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from edge_genarm.export.train import (
    check_options,
    genarm_loss,
    pair_rewards,
    reference_offsets,
    with_reference,
)
from edge_genarm.export.train_loop import Objective, data_digest, fit, prepare_model, start_run

from edge_genarm.errors import ConfigError
from edge_genarm.paths import atomic_write_json

ARM_INFO = "edge_genarm_arm.json"


def arm_objective(model, pad: int, device, beta_r: float) -> Objective:
    """The GenARM loss on summed reply log-probs, relative to the reference's margin when the pairs
    carry one (`with_reference`)."""

    def loss(part):
        r_w, r_l = pair_rewards(model, part, pad, device)
        r_w = r_w - reference_offsets(part, device)
        return genarm_loss(r_w, r_l, beta_r), r_w > r_l

    def margin(part):
        r_w, r_l = pair_rewards(model, part, pad, device)
        return r_w - r_l - reference_offsets(part, device)

    return Objective(loss, margin)


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
    chat_template: str | None = None,
) -> dict:
    """Train an ARM on `data` from `init` into `out`; returns what edge_genarm_arm.json records.

    `chat_template` (text): the template the pairs' prompts are rendered with, over the one the
    `weights` bundle or the init carries: the text the runtime will send (a pack's template).

    `reference`: score each reply relative to the init (r - r_init, see `with_reference`)."""
    import torch

    check_options(beta_r, max_len, eval_frac, on_long, on_error)
    if reference and not lora_r:
        raise ConfigError(
            "--reference needs LoRA (the init with its adapters off is the reference): drop --full"
        )
    run = start_run(data, out, ARM_INFO, "ARM", force, device, on_error)
    lr = lr if lr is not None else (5e-4 if lora_r else 1e-5)
    torch.manual_seed(seed)
    model, tok = prepare_model(init, layers, lora_r, run.device, lora_targets, lora_layers)
    enc, pad = run.encode(tok, weights, max_len, on_long, chat_template)
    if reference:
        enc = with_reference(model, enc, pad, run.device, micro_batch)
    settings = dict(data=data_digest(run.data), init=str(Path(init).resolve()), beta_r=beta_r, lora_r=lora_r,
                    lora_targets=lora_targets, lora_layers=lora_layers, layers=layers, lr=lr, epochs=epochs,
                    batch_size=batch_size, max_len=max_len, on_long=on_long, eval_frac=eval_frac, seed=seed,
                    n=len(enc))  # fmt: skip
    if chat_template:  # only when given: checkpoints of earlier runs keep their key
        settings["chat_template"] = hashlib.sha256(chat_template.encode()).hexdigest()[:16]
    if reference:  # only when set: checkpoints of earlier runs keep their key
        settings["reference"] = True
    figures, held = fit(run, model, enc, arm_objective(model, pad, run.device, beta_r), settings, lr=lr,
                        epochs=epochs, batch_size=batch_size, micro=micro_batch, eval_frac=eval_frac, seed=seed,
                        save_every=save_every, progress=progress, desc="train-arm")  # fmt: skip
    method = f"lora r={lora_r} ({lora_targets}{f', last {lora_layers} layers' if lora_layers else ''})"
    info = {
        "beta_r": beta_r, "data": str(run.data.resolve()), "init": str(Path(init).resolve()),
        "reward": "relative to the init" if reference else "summed log-prob", "lora_layers": lora_layers,
        **figures,
        "layers": model.config.num_hidden_layers, "method": method if lora_r else "full", "lr": lr,
        "max_len": max_len,
        **run.record(**({"heldout_reference_margins": [e[3] for e in held]} if reference else {})),
    }  # fmt: skip
    save_arm(model, tok, run.out, info, bool(lora_r))
    return info


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
