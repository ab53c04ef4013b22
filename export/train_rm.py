"""Train a trajectory-level reward model (for Best-of-N and ARGS) from preference pairs.

The model is the base with LoRA on its last layers and a scalar score head w (no bias) on the
final, normed hidden state at a sequence's last token:

    r(x, y) = w . h_T(x, y)          (T: the reply's last token, its EOS when the reply finished)
    L       = -log sigmoid(r(x, y_w) - r(x, y_l))          (Bradley-Terry)

The score head takes the LM head's place (a "vocabulary" of 1), so the trained module is a
causal LM whose logits [batch, seq, 1] are the reward of every prefix: export/rm_export.py
turns it into optimum's text-generation-with-past graph, which the runtime runs with the ARM
backend's KV cache. On disk the result is a standard Hugging Face sequence classifier
(`*ForSequenceClassification`, num_labels 1, `score.weight`) plus `edge_genarm_rm.json`.
Pairs, chat template and tokenization are train-arm's (export/train.py); so are the seeded
held-out split and the checkpoints (export/train_loop.py).
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from collections import deque
from pathlib import Path

from edge_genarm.export.train import check_options, encode_pairs, load_pairs
from edge_genarm.export.train_loop import (
    check_base_tokens,
    data_digest,
    load_checkpoint,
    prepare_model,
    save_checkpoint,
    settings_key,
    split,
    step_plan,
)

from edge_genarm.errors import ConfigError
from edge_genarm.paths import atomic_write_json

RM_INFO = "edge_genarm_rm.json"


# ---------------------------------------------------------------------------
# the model: a causal LM whose LM head is the score head
# ---------------------------------------------------------------------------


def attach_score_head(lm, seed: int = 0) -> None:
    """Replace the LM head by a (hidden -> 1) score head, N(0, 1/hidden) from `seed`."""
    import torch

    h = lm.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(h, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, h, generator=gen) / h**0.5)
    lm.config.tie_word_embeddings = False  # the embedding stays; the head is its own weight
    lm.lm_head = head.to(lm.get_input_embeddings().weight.device)


def prepare_rm(init, lora_r: int, device, targets: str = "all", lora_layers: int | None = 8, seed: int = 0):
    """(trainable model, the inner causal LM with its score head, tokenizer)."""
    model, tok = prepare_model(init, None, lora_r, device, targets, lora_layers)
    lm = model.get_base_model()
    attach_score_head(lm, seed)  # after LoRA wrapping: peft froze the rest, the new head trains
    return model, lm, tok


def sequence_rewards(model, seqs: list[list[int]], pad_id: int, device):
    """r per sequence: the score head's output at each sequence's last token (right-padded batch)."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[..., 0].float()
    last = torch.tensor([len(s) - 1 for s in seqs], device=out.device)
    return out[torch.arange(len(seqs), device=out.device), last]


def pair_scores(model, enc: list[tuple], pad_id: int, device):
    """(r_w, r_l) for encoded pairs (prompt, chosen, rejected), in one forward of 2 * len(enc) rows."""
    r = sequence_rewards(model, [p + w for p, w, _ in enc] + [p + lo for p, _, lo in enc], pad_id, device)
    return r[: len(enc)], r[len(enc) :]


def bt_loss(r_w, r_l):
    """Per pair: -log sigmoid(r_w - r_l)."""
    import torch.nn.functional as F

    return -F.logsigmoid(r_w - r_l)


def evaluate_rm(model, enc: list[tuple], pad_id: int, device, micro: int) -> dict:
    """Held-out accuracy (share of pairs with r_w > r_l) and mean margin r_w - r_l."""
    import torch

    if not enc:
        return {"n": 0, "accuracy": None, "margin": None}
    was = model.training
    model.eval()
    wins, margins = 0, []
    with torch.no_grad():
        for i in range(0, len(enc), micro):
            r_w, r_l = pair_scores(model, enc[i : i + micro], pad_id, device)
            wins += int((r_w > r_l).sum())
            margins += (r_w - r_l).tolist()
    model.train(was)
    return {"n": len(enc), "accuracy": wins / len(enc), "margin": sum(margins) / len(margins)}


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def check_rm_options(lora_r, lora_layers, epochs, batch_size, micro_batch) -> None:
    for name, v in (("--lora", lora_r), ("--epochs", epochs), ("--batch-size", batch_size),
                    ("--micro-batch", micro_batch)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    if lora_layers is not None and (not isinstance(lora_layers, int) or lora_layers < 1):
        raise ConfigError(f"--lora-layers must be an integer >= 1, got {lora_layers!r}")


def train_rm(
    data: str | Path,
    init: str | Path,
    out: str | Path,
    lora_r: int = 16,
    lora_layers: int | None = 8,
    lora_targets: str = "all",
    lr: float = 1e-3,
    epochs: int = 1,
    batch_size: int = 8,
    micro_batch: int = 8,
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
) -> dict:
    """Train a reward model on `data` from `init` into `out`; returns what edge_genarm_rm.json records."""
    import torch

    check_options(1.0, max_len, eval_frac, on_long, on_error)
    check_rm_options(lora_r, lora_layers, epochs, batch_size, micro_batch)
    data, out = Path(data), Path(out)
    if (out / RM_INFO).is_file() and not force:
        raise ConfigError(f"'{out}' already holds a trained reward model: choose another -o, or --force")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stats: dict = {}
    pairs = load_pairs(data, on_error, stats)
    torch.manual_seed(seed)
    model, lm, tok = prepare_rm(init, lora_r, device, lora_targets, lora_layers, seed)
    if weights:
        check_base_tokens(weights, tok, out.name)
    enc = encode_pairs(tok, pairs, max_len, on_long, stats)
    tr, ho = split(len(enc), eval_frac, seed)
    train_enc, eval_enc = [enc[i] for i in tr], [enc[i] for i in ho]
    settings = dict(kind="rm", data=data_digest(data), init=str(Path(init).resolve()), lora_r=lora_r)
    settings.update(lora_targets=lora_targets, lora_layers=lora_layers, lr=lr, epochs=epochs)
    settings.update(batch_size=batch_size, max_len=max_len, on_long=on_long, eval_frac=eval_frac)
    settings.update(seed=seed, n=len(enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plan = step_plan(len(train_enc), batch_size, epochs, seed)
    t0 = time.time()
    before = evaluate_rm(model, eval_enc, pad, device, micro_batch)
    curve: list[dict] = []

    def on_eval(step):
        ev = evaluate_rm(model, eval_enc, pad, device, micro_batch)
        curve.append({"step": step, "accuracy": ev["accuracy"], "margin": ev["margin"]})
        if ev["n"]:
            print(f"\nstep {step}: held-out accuracy {ev['accuracy']:.3f}", file=sys.stderr)

    losses = run_rm_steps(
        model, train_enc, plan, pad, device, out, settings, lr, micro_batch, save_every, progress,
        eval_at={round(len(plan) * (e + 1) / epochs) for e in range(epochs - 1)}, on_eval=on_eval,
    )  # fmt: skip
    after = evaluate_rm(model, eval_enc, pad, device, micro_batch)
    info = {
        "kind": "rm", "data": str(data.resolve()), "init": str(Path(init).resolve()),
        "n_pairs": len(enc), "n_train": len(train_enc), "n_heldout": len(eval_enc),
        "heldout_accuracy": after["accuracy"], "heldout_margin": after["margin"],
        "heldout_accuracy_before": before["accuracy"], "heldout_margin_before": before["margin"],
        "heldout_curve": curve,
        "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None,
        "steps": len(plan), "epochs": epochs, "batch_size": batch_size, "layers": lm.config.num_hidden_layers,
        "method": f"lora r={lora_r} ({lora_targets}{f', last {lora_layers} layers' if lora_layers else ''})"
                  " + score head",
        "lr": lr, "max_len": max_len, "eval_frac": eval_frac, "seed": seed,
        "truncated": stats.get("truncated", 0), "skipped_long": stats.get("skipped_long", 0),
        "bad_lines": stats.get("bad_lines", 0), "seconds": round(time.time() - t0, 1), "device": str(device),
    }  # fmt: skip
    save_rm(model.merge_and_unload(), tok, out, info, pad)
    return info


def run_rm_steps(model, enc, plan, pad, device, out, settings, lr, micro, save_every, progress,
                 eval_at=(), on_eval=None) -> list[float]:  # fmt: skip
    """AdamW + cosine schedule over `plan` (train-arm's), checkpoints every `save_every` steps, resumes.
    Returns the batch loss of each step run here."""
    import torch
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(0, len(plan) // 20), len(plan))
    key = settings_key(settings)
    start, running = load_checkpoint(out, model, opt, sched, key)
    wins = deque(running.get("wins", []), maxlen=64)
    model.train()
    losses = []
    bar = tqdm(range(start, len(plan)), desc="train-rm", unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        batch = [enc[i] for i in plan[step]]
        total = 0.0
        for i in range(0, len(batch), micro):
            r_w, r_l = pair_scores(model, batch[i : i + micro], pad, device)
            loss = bt_loss(r_w, r_l).sum() / len(batch)
            loss.backward()
            total += loss.item()
            wins.extend((r_w > r_l).tolist())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}", acc=f"{sum(wins) / len(wins):.2f}")
        if on_eval and step + 1 in eval_at:
            on_eval(step + 1)
        if save_every and (step + 1) % save_every == 0 and step + 1 < len(plan):
            save_checkpoint(out, model, opt, sched, step + 1, key, {"wins": list(wins)})
    bar.close()
    return losses


# ---------------------------------------------------------------------------
# on disk: a Hugging Face sequence classifier (num_labels 1, score.weight)
# ---------------------------------------------------------------------------


def save_rm(lm, tok, out: Path, info: dict, pad_id: int) -> None:
    """Write `lm` (score head as its LM head) as a `*ForSequenceClassification` folder; the info file last."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    part = out / ".model.partial"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    state = {
        k: v.detach().cpu().contiguous() for k, v in lm.state_dict().items() if not k.startswith("lm_head.")
    }
    state["score.weight"] = lm.lm_head.weight.detach().cpu().contiguous()
    save_file(state, part / "model.safetensors", metadata={"format": "pt"})
    cfg = copy.deepcopy(lm.config)
    cfg.architectures = [type(lm).__name__.replace("ForCausalLM", "ForSequenceClassification")]
    cfg.num_labels, cfg.pad_token_id = 1, pad_id
    cfg.tie_word_embeddings, cfg.use_cache = False, True
    cfg.save_pretrained(part)
    tok.save_pretrained(part)
    for f in part.iterdir():
        f.replace(out / f.name)
    part.rmdir()
    atomic_write_json(out / RM_INFO, info)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    acc = info.get("heldout_accuracy")
    print(
        f"reward model saved to {out}: {info.get('steps')} steps, held-out accuracy "
        f"{'n/a' if acc is None else f'{acc:.3f}'} (before {info.get('heldout_accuracy_before')}) "
        f"on {info.get('n_heldout')} pairs",
        file=sys.stderr,
    )


def load_rm(folder: str | Path):
    """(causal LM whose LM head is the score head, tokenizer) from a reward-model folder."""
    import torch
    from edge_genarm.export.sources import SourceError, check_hf_dir
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    check_hf_dir(folder)
    cfg = AutoConfig.from_pretrained(folder)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    if cfg.num_labels != 1 or "score.weight" not in state:
        raise SourceError(
            f"'{folder}' is not a reward model (it needs num_labels 1 and a 'score.weight' head, "
            "saved as safetensors): train one with `edge-genarm train-rm`"
        )
    cfg.tie_word_embeddings = False
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    lm.lm_head = torch.nn.Linear(cfg.hidden_size, 1, bias=False)
    state["lm_head.weight"] = state.pop("score.weight")
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SourceError(
            f"'{folder}' does not fit a {cfg.model_type} reward model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): train it again with `edge-genarm train-rm`"
        )
    return lm.float().eval(), AutoTokenizer.from_pretrained(folder)


def save_untrained_rm(init: str | Path, out: str | Path, seed: int = 0) -> Path:
    """`init` with a random score head (no training), saved as a reward-model folder (test fixtures)."""
    from edge_genarm.export.sources import load_source

    lm, tok = load_source(init)
    attach_score_head(lm, seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    save_rm(lm, tok, Path(out), {"kind": "rm", "init": str(Path(init).resolve()), "steps": 0}, pad)
    return Path(out)
