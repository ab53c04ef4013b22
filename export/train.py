"""Train a GenARM autoregressive reward model (ARM) from preference pairs.

The reward of a response is its summed log-prob under the ARM (prompt masked):

    r(x, y) = sum_t log pi_r(y_t | x, y_<t)
    L       = -log sigmoid(beta_r * (r(x, y_w) - r(x, y_l)))

no reference model, no length normalisation (ALGORITHMS.md section 1). Prompts
go through the chat template the runtime applies; a response is its tokens + EOS
(no EOS when the pair file marks it cut at max_tokens: "finish": "length").
The run is `export.train_arm`; the loop (LoRA or full, checkpoints, held-out accuracy) is
`export.train_loop`, shared with reward-model training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_genarm.export.prefs import DataError, report_bad_line

from edge_genarm.errors import ConfigError

IGNORE = -100  # label of a position that is not scored (prompt, padding)
HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"


@dataclass
class Pair:
    prompt: str | list[dict]  # one user message, or a message list (HH transcripts)
    chosen: str
    rejected: str
    line: int
    # False where the sampler cut the response at max_tokens ("finish": "length"): no EOS follows it
    finished: tuple[bool, bool] = (True, True)


# ---------------------------------------------------------------------------
# pair files: {"prompt","chosen","rejected"} or HH-RLHF {"chosen","rejected"} transcripts
# ---------------------------------------------------------------------------


def parse_hh(transcript: str) -> tuple[list[dict], str]:
    """Split an HH-RLHF transcript at its last "\\n\\nAssistant:" into (messages, response)."""
    head, sep, response = transcript.rpartition(HH_ASSISTANT)
    if not sep:
        raise ValueError('no "\\n\\nAssistant:" turn')
    messages = []
    for chunk in head.split(HH_HUMAN)[1:]:
        human, *assistants = chunk.split(HH_ASSISTANT)
        messages.append({"role": "user", "content": human.strip()})
        messages += [{"role": "assistant", "content": a.strip()} for a in assistants]
    if not messages:
        raise ValueError('no "\\n\\nHuman:" turn before the last "\\n\\nAssistant:"')
    return messages, response.strip()


def parse_pair(rec, line: int) -> Pair:
    """A Pair from one decoded JSON line, or ValueError saying what is wrong."""
    if (
        not isinstance(rec, dict)
        or not isinstance(rec.get("chosen"), str)
        or not isinstance(rec.get("rejected"), str)
    ):
        raise ValueError('needs "chosen" and "rejected" strings (and "prompt", unless HH-RLHF transcripts)')
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise ValueError('"prompt" must be a non-empty string')
        pair = Pair(rec["prompt"], rec["chosen"], rec["rejected"], line)
    else:
        (pw, w), (pl, lo) = parse_hh(rec["chosen"]), parse_hh(rec["rejected"])
        if pw != pl:
            raise ValueError("chosen and rejected transcripts have different conversations before the reply")
        pair = Pair(pw, w, lo, line)
    for key in ("chosen", "rejected"):
        if not getattr(pair, key).strip():
            raise ValueError(f'"{key}" response is empty: fill it in or drop the pair')
    finish = rec.get("finish", {})
    if not isinstance(finish, dict) or not set(finish.values()) <= {"stop", "length"}:
        raise ValueError('"finish" must map chosen/rejected to "stop" or "length"')
    pair.finished = (finish.get("chosen") != "length", finish.get("rejected") != "length")
    return pair


def load_pairs(path: str | Path, on_error: str = "stop", stats: dict | None = None) -> list[Pair]:
    """Every usable pair of a JSONL file; bad lines raise DataError (line number) or are counted."""
    stats = {} if stats is None else stats
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pair file '{path}' does not exist: make one with `edge-genarm prefs`")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                pairs.append(parse_pair(json.loads(raw), i))
            except ValueError as e:
                report_bad_line(f"{path} line {i}: {e}", on_error, stats)
    if not pairs:
        raise DataError(f"'{path}' has no usable pairs: each line needs prompt/chosen/rejected")
    return pairs


# ---------------------------------------------------------------------------
# tokenization: chat template for the prompt, response tokens + EOS
# ---------------------------------------------------------------------------


def prompt_ids(tok, prompt: str | list[dict]) -> list[int]:
    """Token ids of the templated prompt, as the runtime builds them (BOS only if the model adds one)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    bos = tok.bos_token_id
    if tok.init_kwargs.get("add_bos_token") and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def response_ids(tok, response: str, finished: bool = True) -> list[int]:
    """The response's tokens, + EOS when the response ended there (not when cut at max_tokens)."""
    return tok(response, add_special_tokens=False).input_ids + ([tok.eos_token_id] if finished else [])


def fit(p: list[int], w: list[int], lo: list[int], max_len: int, on_long: str):
    """(p, w, l) cut so each sequence has at most max_len tokens; None to skip; plus 'cut'/'ok'."""
    room = max_len - len(p)
    if len(p) + max(len(w), len(lo)) <= max_len:
        return (p, w, lo), "ok"
    if on_long == "skip" or room < 1:
        return None, "skip"
    return (p, w[:room], lo[:room]), "cut"


def encode_pairs(tok, pairs: list[Pair], max_len: int = 512, on_long: str = "truncate", stats=None):
    """[(prompt_ids, chosen_ids, rejected_ids)]; long pairs are cut or skipped and counted in stats."""
    stats = {} if stats is None else stats
    stats.update(truncated=0, skipped_long=0)
    out = []
    for pair in pairs:
        p = prompt_ids(tok, pair.prompt)
        w, lo = (response_ids(tok, text, f) for text, f in zip((pair.chosen, pair.rejected), pair.finished))
        enc, what = fit(p, w, lo, max_len, on_long)
        if what == "cut":
            stats["truncated"] += 1
        elif what == "skip":
            stats["skipped_long"] += 1
            continue
        out.append(enc)
    if stats["truncated"] or stats["skipped_long"]:
        print(
            f"{stats['truncated']} pairs over --max-len {max_len} truncated, {stats['skipped_long']} skipped "
            "(raise --max-len to keep them whole)",
            file=sys.stderr,
        )
    if not out:
        raise DataError(f"every pair is longer than --max-len {max_len}: raise --max-len")
    return out


# ---------------------------------------------------------------------------
# the math: masked sequences, summed response log-probs, the GenARM loss
# ---------------------------------------------------------------------------


def build_sequence(p: list[int], r: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are IGNORE on prompt tokens and the response ids after."""
    return p + r, [IGNORE] * len(p) + r


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded tensors (input_ids, attention_mask, labels) from build_sequence outputs."""
    import torch

    n = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def response_logprobs(model, ids, mask, labels):
    """r = sum over labelled positions t of log pi(labels_t | ids_<t), one per row.

    Logits are computed only from the first labelled position on (`logits_to_keep`):
    prompt positions are never scored, and the vocab-wide logits dominate memory.
    """
    import torch.nn.functional as F

    labelled = (labels != IGNORE).any(0).nonzero()
    first = max(1, int(labelled[0])) if len(labelled) else ids.shape[1] - 1  # position 0 has no context
    keep = ids.shape[1] - first + 1  # positions first-1 .. n-1; the last one predicts nothing
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), labels[:, first:], ignore_index=IGNORE, reduction="none")
    return -nll.sum(-1)


def genarm_loss(r_w, r_l, beta_r: float):
    """Per pair: -log sigmoid(beta_r * (r_w - r_l))."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta_r * (r_w - r_l))


def pair_rewards(model, enc: list[tuple], pad_id: int, device):
    """(r_w, r_l) for a micro-batch of encoded pairs, in one forward of 2 * len(enc) rows."""
    seqs = [build_sequence(e[0], e[1]) for e in enc] + [build_sequence(e[0], e[2]) for e in enc]
    ids, mask, labels = (t.to(device) for t in collate(seqs, pad_id))
    r = response_logprobs(model, ids, mask, labels)
    return r[: len(enc)], r[len(enc) :]


def reference_offsets(enc: list[tuple], device):
    """Per pair, the reference's margin to subtract (the 4th item of a relative pair), else 0."""
    import torch

    return torch.tensor([e[3] if len(e) > 3 else 0.0 for e in enc], dtype=torch.float32, device=device)


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


def check_options(beta_r: float, max_len: int, eval_frac: float, on_long: str, on_error: str) -> None:
    if not beta_r > 0:
        raise ConfigError(f"--beta-r must be > 0, got {beta_r} (the paper uses 0.05 for HH-RLHF)")
    if max_len < 2:
        raise ConfigError(f"--max-len must be at least 2 tokens, got {max_len}")
    if not 0 <= eval_frac < 1:
        raise ConfigError(f"--eval-frac must be in [0, 1), got {eval_frac}")
    if on_long not in ("truncate", "skip") or on_error not in ("skip", "stop"):
        raise ConfigError("--on-long is truncate|skip and --on-error is skip|stop")
