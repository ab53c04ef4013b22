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
Pairs, chat template and tokenization are train-arm's (export/train.py); so is the training
loop: the seeded held-out split, the checkpoints, the held-out figures (export/train_loop.py).
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

from edge_genarm.export.train import check_options
from edge_genarm.export.train_loop import Objective, data_digest, fit, prepare_model, start_run

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


def rm_objective(model, pad: int, device) -> Objective:
    """The Bradley-Terry loss on the score head's rewards; the held-out margin is r_w - r_l."""

    def loss(part):
        r_w, r_l = pair_scores(model, part, pad, device)
        return bt_loss(r_w, r_l), r_w > r_l

    def margin(part):
        r_w, r_l = pair_scores(model, part, pad, device)
        return r_w - r_l

    return Objective(loss, margin)


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
    run = start_run(data, out, RM_INFO, "reward model", force, device, on_error)
    torch.manual_seed(seed)
    model, lm, tok = prepare_rm(init, lora_r, run.device, lora_targets, lora_layers, seed)
    enc, pad = run.encode(tok, weights, max_len, on_long)
    settings = dict(kind="rm", data=data_digest(run.data), init=str(Path(init).resolve()), lora_r=lora_r,
                    lora_targets=lora_targets, lora_layers=lora_layers, lr=lr, epochs=epochs,
                    batch_size=batch_size, max_len=max_len, on_long=on_long, eval_frac=eval_frac, seed=seed,
                    n=len(enc))  # fmt: skip
    figures, _ = fit(run, model, enc, rm_objective(model, pad, run.device), settings, lr=lr, epochs=epochs,
                     batch_size=batch_size, micro=micro_batch, eval_frac=eval_frac, seed=seed,
                     save_every=save_every, progress=progress, desc="train-rm")  # fmt: skip
    info = {
        "kind": "rm", "data": str(run.data.resolve()), "init": str(Path(init).resolve()),
        **figures,
        "batch_size": batch_size, "layers": lm.config.num_hidden_layers,
        "method": f"lora r={lora_r} ({lora_targets}{f', last {lora_layers} layers' if lora_layers else ''})"
                  " + score head",
        "lr": lr, "max_len": max_len, "eval_frac": eval_frac, "seed": seed,
        **run.record(),
    }  # fmt: skip
    save_rm(model.merge_and_unload(), tok, run.out, info, pad)
    return info


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
