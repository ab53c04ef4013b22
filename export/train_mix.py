"""`edge-genarm train-mix`: one head for every weight vector of several objectives (issue 21).

GenARM runs one ARM per objective, so each objective a user turns on costs another head per
token. PARM (Lin et al., ICML 2025) trains one preference-conditioned ARM instead; this is our
own, simpler form of it, on the shared-trunk layout the packs already use:

- The head is the base's last K layers (+ final norm and LM head), each of their seven
  matrices with a **gated LoRA per objective**:

      W x + s * sum_i a_i B_i A_i x          a = the objectives' weights, normalized to sum 1

  so a = (1, 0) is "positive alone", (0.5, 0.5) the even mix, and one head serves them all.
  At run time the guidance is `log p_base + S * log pi_a` with S the weights' sum: the same
  form as `sum_i w_i log pi_i`, one head instead of one per objective.
- Training: per step a is drawn (uniform on the segment for two objectives; a vertex one step
  in four), and the loss is `sum_i a_i * GenARM_i(pairs of objective i; head at a)`, each
  objective with its own beta_r, max_len and reference setting (export/train.py).
- The frozen layers 0..L-K-1 run once: their output at every position of every pair is kept,
  so a step costs the head's K layers and the LM head on reply positions only.

Output, OUT/: `mix.safetensors` (per layer and matrix: A (n*r, in) and B (out, n*r), float16,
objective-major blocks) and `mix.json` (objectives, rank, scale, layers, the settings, the
held-out accuracy at each vertex and the mid point, time). Both are written atomically; an
epoch's end leaves a checkpoint a rerun resumes from.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_genarm.errors import ConfigError
from edge_genarm.paths import atomic_write_json

MIX_INFO = "mix.json"
MIX_WEIGHTS = "mix.safetensors"
MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
_HF = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
       "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip


@dataclass
class ObjectiveData:
    name: str
    data: Path
    beta_r: float = 0.05
    reference: bool = False
    max_len: int = 512
    eval_frac: float = 0.15


# ---------------------------------------------------------------------------
# the head in torch: K llama layers from `hidden`, gated LoRA on every matrix
# ---------------------------------------------------------------------------


def _head_class():
    import torch
    from torch import nn

    class MixHead(nn.Module):
        def __init__(self, layers, norm, lm_head, inv_freq, eps, n_heads, n_kv, n_obj, rank, scale):
            super().__init__()
            self.w = [{k: torch.as_tensor(np.ascontiguousarray(L[k]), dtype=torch.float32) for k in L} for L in layers]
            self.norm = torch.as_tensor(np.asarray(norm), dtype=torch.float32)
            self.lm = torch.as_tensor(np.ascontiguousarray(lm_head), dtype=torch.float32)  # (d, V)
            self.inv_freq = torch.as_tensor(np.asarray(inv_freq), dtype=torch.float32)
            self.eps, self.h, self.kv, self.n_obj, self.rank, self.scale = eps, n_heads, n_kv, n_obj, rank, scale
            self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
            g = torch.Generator().manual_seed(0)
            for j, L in enumerate(layers):
                for k in MATRICES:
                    d_in, d_out = L[k].shape
                    bound = 1 / math.sqrt(d_in)  # peft's kaiming-uniform(a=sqrt 5) bound for A
                    a = (torch.rand(n_obj * rank, d_in, generator=g) * 2 - 1) * bound
                    self.A[f"{j}_{k}"] = nn.Parameter(a)
                    self.B[f"{j}_{k}"] = nn.Parameter(torch.zeros(d_out, n_obj * rank))

        def _lin(self, x, j, k, gate):
            y = x @ self.w[j][k]
            if gate is None:
                return y
            return y + self.scale * (((x @ self.A[f"{j}_{k}"].T) * gate) @ self.B[f"{j}_{k}"].T)

        def _rms(self, x, w):
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * w

        def forward(self, x, alpha=None):
            """x (b, n, d) hidden states entering the head; alpha (n_obj,) or None (no LoRA: the base).
            Returns the normed hidden states (b, n, d)."""
            import torch.nn.functional as F

            b, n, _ = x.shape
            gate = None if alpha is None else alpha.repeat_interleave(self.rank)
            ang = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None]
            cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

            def rope(t):  # (b, heads, n, hd), halves rotated
                half = t.shape[-1] // 2
                return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

            for j in range(len(self.w)):
                h = self._rms(x, self.w[j]["ln1"])
                q = self._lin(h, j, "q", gate).view(b, n, self.h, -1).transpose(1, 2)
                k = self._lin(h, j, "k", gate).view(b, n, self.kv, -1).transpose(1, 2)
                v = self._lin(h, j, "v", gate).view(b, n, self.kv, -1).transpose(1, 2)
                q, k = rope(q), rope(k)
                rep = self.h // self.kv
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, -1)
                x = x + self._lin(att, j, "o", gate)
                h = self._rms(x, self.w[j]["ln2"])
                act = F.silu(self._lin(h, j, "gate", gate)) * self._lin(h, j, "up", gate)
                x = x + self._lin(act, j, "down", gate)
            return self._rms(x, self.norm)

    return MixHead


# ---------------------------------------------------------------------------
# data: the frozen trunk's output at every position, computed once
# ---------------------------------------------------------------------------


def trunk_states(model, seqs: list[list[int]], k: int, batch: int = 8, log=print) -> list:
    """For each token sequence, the hidden state entering layer k at every position (float16
    tensors (n, d)), from the HF model's frozen layers; prompts shared by two replies are not
    run twice (the caller passes unique sequences)."""
    import torch

    inner = model.model
    keep_layers = inner.layers
    inner.layers = keep_layers[: k + 1]  # hidden_states[k] is the input of layer k (pre-norm)
    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    t0 = time.time()
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch):
                idx = order[s : s + batch]
                n = max(len(seqs[i]) for i in idx)
                ids = torch.zeros((len(idx), n), dtype=torch.long)
                mask = torch.zeros((len(idx), n), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[r, : len(seqs[i])] = 1
                hs = inner(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[k]
                for r, i in enumerate(idx):
                    out[i] = hs[r, : len(seqs[i])].to(torch.float16).clone()
                if s // batch % 20 == 0:
                    log(f"  trunk states {min(s + batch, len(order))}/{len(order)} ({time.time() - t0:.0f} s)")
    finally:
        inner.layers = keep_layers
    return out


def _cached_states(out: Path, model, seqs: list[list[int]], k: int, log) -> list:
    """trunk_states, kept in OUT/trunk-states.pt (float16) for a rerun with other settings: the
    key is the layer and every sequence, so other pairs or another template compute them again."""
    import hashlib

    import torch

    key = hashlib.sha256(json.dumps([k, seqs]).encode()).hexdigest()[:16]
    path = out / f"trunk-states-{k}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved.get("key") == key:
            log(f"layers 0-{k - 1}: their outputs over {len(seqs)} sequences read from {path}")
            return saved["states"]
    log(f"running layers 0-{k - 1} once over {len(seqs)} sequences ({sum(map(len, seqs))} tokens)")
    states = trunk_states(model, seqs, k, log=log)
    tmp = path.with_suffix(".partial")
    torch.save({"key": key, "states": states}, tmp)
    tmp.replace(path)
    return states


def _reply_logprob_sums(head, states, items, alpha, pad_d):
    """Summed log-probs of each item's reply under the head at `alpha`: items are
    (state index, prompt length, reply ids)."""
    import torch
    import torch.nn.functional as F

    n = max(len(states[i]) for i, _, _ in items)
    x = torch.zeros((len(items), n, pad_d))
    for r, (i, _, _) in enumerate(items):
        x[r, : len(states[i])] = states[i].float()
    normed = head(x, alpha)
    out = []
    for r, (_, p, reply) in enumerate(items):
        z = normed[r, p - 1 : p - 1 + len(reply)] @ head.lm
        out.append(-F.cross_entropy(z, torch.tensor(reply), reduction="sum"))
    return torch.stack(out)


class _Objective:
    """One objective's encoded pairs, split, and the index of each sequence's trunk states."""

    def __init__(self, spec: ObjectiveData, enc: list[tuple], seq_index: dict, seed: int):
        from edge_genarm.export.train_loop import split

        self.spec = spec
        self.pairs = []  # (state index of p+w, state index of p+l, prompt len, w, l, reference margin)
        for p, w, lo in enc:
            self.pairs.append([seq_index[tuple(p + w)], seq_index[tuple(p + lo)], len(p), w, lo, 0.0])
        self.train, self.held = split(len(self.pairs), spec.eval_frac, seed)

    def margins(self, head, states, idx, alpha, d):
        items = [(self.pairs[i][0], self.pairs[i][2], self.pairs[i][3]) for i in idx]
        items += [(self.pairs[i][1], self.pairs[i][2], self.pairs[i][4]) for i in idx]
        r = _reply_logprob_sums(head, states, items, alpha, d)
        return r[: len(idx)] - r[len(idx) :]


def _accuracy(obj: _Objective, head, states, alpha, d, micro=8) -> dict:
    import torch

    if not obj.held:
        return {"n": 0, "accuracy": None, "margin": None}
    ms = []
    with torch.no_grad():
        for s in range(0, len(obj.held), micro):
            idx = obj.held[s : s + micro]
            ref = torch.tensor([obj.pairs[i][5] for i in idx])
            ms += (obj.margins(head, states, idx, alpha, d) - ref).tolist()
    return {"n": len(ms), "accuracy": sum(m > 0 for m in ms) / len(ms), "margin": sum(ms) / len(ms)}


def draw_alpha(n: int, rng: random.Random) -> list[float]:
    """A weight vector on the simplex: a vertex one draw in four, else uniform (Dirichlet(1))."""
    if rng.random() < 0.25:
        a = [0.0] * n
        a[rng.randrange(n)] = 1.0
        return a
    g = [rng.expovariate(1.0) for _ in range(n)]
    return [x / sum(g) for x in g]


# ---------------------------------------------------------------------------
# distillation: the mix head learns the exact mode's own mixture of the separate ARMs
# ---------------------------------------------------------------------------


def layer_weights(sd: dict, first: int, last: int) -> list[dict]:
    """Layers [first, last) of an HF llama state dict as (in, out) numpy matrices + norms."""
    out = []
    for i in range(first, last):
        p = f"model.layers.{i}."
        L = {m: sd[p + _HF[m] + ".weight"].detach().numpy().T for m in MATRICES}
        L["ln1"] = sd[p + "input_layernorm.weight"].detach().numpy()
        L["ln2"] = sd[p + "post_attention_layernorm.weight"].detach().numpy()
        out.append(L)
    return out


def teacher_head(make, adapter: Path, n_layers: int):
    """(first adapted layer, the ARM as a one-objective head from there) for a peft adapter of
    the recipe; `make(first)` builds a head over layers first.. with n_obj=1 and the adapter's rank."""
    import torch
    from edge_genarm.export.numpy_build import lora_scale, read_adapter

    cfg, lora = read_adapter(adapter)
    first = min(i for i, _ in lora)
    head = make(first, int(cfg["r"]), float(lora_scale(cfg)))
    with torch.no_grad():
        for (i, key), (a, b) in lora.items():
            head.A[f"{i - first}_{key}"].copy_(torch.from_numpy(a.astype(np.float32)))
            head.B[f"{i - first}_{key}"].copy_(torch.from_numpy(b.astype(np.float32)))
    return first, head


def teacher_targets(states, seqs, spans, teachers, eos: list[int], n_cand: int, log, batch: int = 8) -> list:
    """Per sequence, at each reply position: the base's n_cand likeliest next tokens + the EOS ids
    (`valid` marks an EOS id already among them as a duplicate) and each teacher ARM's log-prob of
    them: (ids (m, C) int32, valid (m, C) bool, lp (n_teachers, m, C) float16). The candidates are
    what the fast mode scores (fastmode.FAST_CANDIDATES); the base is the teachers' head with no LoRA."""
    import torch

    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    base = teachers[0]
    lm = base.lm
    eos_t = torch.tensor(eos, dtype=torch.long)
    t0 = time.time()
    with torch.no_grad():
        for s0 in range(0, len(order), batch):
            idx = order[s0 : s0 + batch]
            n = max(len(seqs[i]) for i in idx)
            x = torch.zeros((len(idx), n, lm.shape[0]))
            for r, i in enumerate(idx):
                x[r, : len(seqs[i])] = states[i].float()
            base_n = base(x, None)
            t_n = [t(x, torch.ones(1)) for t in teachers]
            for r, i in enumerate(idx):
                a, b = spans[i] - 1, len(seqs[i]) - 1
                top = torch.log_softmax(base_n[r, a:b] @ lm, -1).topk(n_cand).indices
                extra = eos_t.expand(len(top), -1)
                ids = torch.cat([top, extra], 1)
                valid = torch.cat([torch.ones_like(top, dtype=torch.bool), ~(top[:, :, None] == eos_t).any(1)], 1)
                lps = [torch.log_softmax(tn[r, a:b] @ lm, -1).gather(1, ids) for tn in t_n]
                out[i] = (ids.int(), valid, torch.stack(lps).half())
            if s0 // batch % 40 == 0:
                log(f"  teacher targets {min(s0 + batch, len(order))}/{len(order)} ({time.time() - t0:.0f} s)")
    return out


def distill_loss(head, states, seqs, spans, targets, idx: list[int], alpha):
    """Mean over the reply positions of `idx` of KL(softmax(sum_i alpha_i lp_i) || softmax(z)) over
    each position's candidates: the exact mode's mixture of the separate ARMs against the head at
    alpha, where the fast mode reads them (shift-invariant: the normalizers do not matter)."""
    import torch

    n = max(len(seqs[i]) for i in idx)
    x = torch.zeros((len(idx), n, head.lm.shape[0]))
    for r, i in enumerate(idx):
        x[r, : len(seqs[i])] = states[i].float()
    normed = head(x, alpha)
    rows = head.lm.T
    total, count = 0.0, 0
    for r, i in enumerate(idx):
        ids, valid, lp = targets[i]
        a, b = spans[i] - 1, len(seqs[i]) - 1
        z = torch.einsum("md,mcd->mc", normed[r, a:b], rows[ids.long()])
        tgt = (alpha[:, None, None] * lp.float()).sum(0)
        ninf = torch.tensor(float("-inf"))
        pt = torch.log_softmax(torch.where(valid, tgt, ninf), -1)
        ps = torch.log_softmax(torch.where(valid, z, ninf), -1)
        kl = torch.where(valid, pt.exp() * (pt - ps), torch.zeros(()))
        total = total + kl.sum()
        count += len(ids)
    return total / max(1, count)


def save_mix(head, out: Path, info: dict) -> None:
    """mix.safetensors (float16) + mix.json, each atomically."""
    from safetensors.numpy import save_file

    arrays = {}
    for key in head.A:
        arrays[f"{key}.A"] = head.A[key].detach().numpy().astype(np.float16)
        arrays[f"{key}.B"] = head.B[key].detach().numpy().astype(np.float16)
    tmp = out / (MIX_WEIGHTS + ".partial")
    save_file(arrays, str(tmp))
    tmp.replace(out / MIX_WEIGHTS)
    atomic_write_json(out / MIX_INFO, info)


def _round_fp16(head) -> None:
    """The head's LoRA weights as they will be saved (float16): figures are measured on those."""
    import torch

    with torch.no_grad():
        for p in list(head.A.values()) + list(head.B.values()):
            p.copy_(p.half().float())


class _Fit:
    """One fit's optimizer (AdamW over the LoRAs), schedule (10 steps of warm-up, then linear to 0
    at step `total`), rng and checkpoint (out/checkpoint.pt, after each epoch, atomically); resumed
    from that checkpoint when it was written with the same `settings`."""

    def __init__(self, head, lr: float, total: int, seed: int, out: Path, settings: dict, log):
        import torch

        self.head, self.settings, self.ck = head, settings, out / "checkpoint.pt"
        self.opt = torch.optim.AdamW(list(head.A.values()) + list(head.B.values()), lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / total)
        )
        self.rng = random.Random(seed)
        self.start_epoch = 0
        if self.ck.is_file():
            st = torch.load(self.ck, weights_only=False)
            if st.get("settings") == settings:
                head.load_state_dict(st["head"], strict=False)
                self.opt.load_state_dict(st["opt"])
                self.sched.load_state_dict(st["sched"])
                self.rng.setstate(st["rng"])
                self.start_epoch = st["epoch"]
                log(f"resuming after epoch {self.start_epoch}")

    def step(self) -> None:
        self.opt.step()
        self.sched.step()

    def save(self, epoch: int) -> None:
        import torch

        tmp = self.ck.with_suffix(".partial")
        torch.save({"settings": self.settings, "head": dict(self.head.state_dict()), "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "rng": self.rng.getstate(), "epoch": epoch}, tmp)  # fmt: skip
        tmp.replace(self.ck)


def _fit_pairs(head, objs, states, d, settings, epochs, lr, batch_size, micro_batch, seed, out, log) -> list:
    """The GenARM loss on every objective's pairs at random mixes (see the module's docstring)."""
    import torch

    # one epoch = one pass over the largest objective's pairs; a smaller objective takes
    # proportionally fewer pairs per step (at least 1), so each objective is seen about once
    biggest = max(len(o.train) for o in objs)
    batches = [max(1, round(batch_size * len(o.train) / biggest)) for o in objs]
    steps_per_epoch = math.ceil(biggest / batch_size)
    settings["batches"] = {o.spec.name: b for o, b in zip(objs, batches)}
    fit = _Fit(head, lr, steps_per_epoch * epochs, seed, out, settings, log)
    rng, opt = fit.rng, fit.opt
    curve = []
    for epoch in range(fit.start_epoch, epochs):
        orders = []
        for o, b in zip(objs, batches):
            perm = list(o.train)
            random.Random(seed * 7919 + epoch).shuffle(perm)
            while len(perm) < steps_per_epoch * b:  # cycles where the rounding leaves it short
                perm += perm[: steps_per_epoch * b - len(perm)]
            orders.append(perm)
        te = time.time()
        run_loss = 0.0
        for step in range(steps_per_epoch):
            a = draw_alpha(len(objs), rng)
            alpha = torch.tensor(a)
            opt.zero_grad()
            loss_val = 0.0
            for w_i, o, order, b in zip(a, objs, orders, batches):
                if w_i == 0:
                    continue
                idx = order[step * b : (step + 1) * b]
                for s0 in range(0, len(idx), micro_batch):
                    part = idx[s0 : s0 + micro_batch]
                    ref = torch.tensor([o.pairs[i][5] for i in part])
                    m = o.margins(head, states, part, alpha, d) - ref
                    loss = -torch.nn.functional.logsigmoid(o.spec.beta_r * m).sum() / len(idx) * w_i
                    loss.backward()
                    loss_val += loss.item()
            fit.step()
            run_loss = 0.9 * run_loss + 0.1 * loss_val if step else loss_val
            if step % 10 == 0:
                log(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {run_loss:.4f} ({time.time() - te:.0f} s)")
        ev = {o.spec.name: _accuracy(o, head, states, torch.tensor([float(j == i) for j in range(len(objs))]), d)["accuracy"]
              for i, o in enumerate(objs)}  # fmt: skip
        curve.append({"epoch": epoch + 1, "loss": run_loss, "held_out_at_vertex": ev, "seconds": round(time.time() - te)})
        log(f"epoch {epoch + 1}: held-out accuracy at each objective's vertex {ev}")
        fit.save(epoch + 1)
    return curve


def _fit_distill(head, objs, seqs, spans, targets, states, d, settings, epochs, lr, batch_size, seed, out, log) -> list:
    """distill_loss over the sequences of every training pair (both replies), alpha drawn per step;
    the sequences of held-out pairs are never trained on: their KL is the held-out figure."""
    import torch

    held = sorted({i for o in objs for j in o.held for i in o.pairs[j][:2]})
    held_set = set(held)
    train = [i for i in range(len(seqs)) if i not in held_set and targets[i] is not None]
    settings["distill_sequences"] = {"train": len(train), "held_out": len(held)}
    steps_per_epoch = math.ceil(len(train) / batch_size)
    fit = _Fit(head, lr, steps_per_epoch * epochs, seed, out, settings, log)
    rng, opt = fit.rng, fit.opt
    n = len(objs)
    points = {"vertex " + o.spec.name: [float(j == i) for j in range(n)] for i, o in enumerate(objs)}
    points["even"] = [1.0 / n] * n

    def held_kl() -> dict:
        with torch.no_grad():
            return {k: round(float(distill_loss(head, states, seqs, spans, targets, held[:64], torch.tensor(a))), 4)
                    for k, a in points.items()}  # fmt: skip

    curve = [{"epoch": 0, "held_out_kl": held_kl()}]
    log(f"before training: held-out KL {curve[0]['held_out_kl']}")
    for epoch in range(fit.start_epoch, epochs):
        order = list(train)
        random.Random(seed * 7919 + epoch).shuffle(order)
        te, run_loss = time.time(), 0.0
        for step in range(steps_per_epoch):
            alpha = torch.tensor(draw_alpha(n, rng))
            opt.zero_grad()
            loss = distill_loss(head, states, seqs, spans, targets, order[step * batch_size : (step + 1) * batch_size], alpha)
            loss.backward()
            fit.step()
            run_loss = 0.9 * run_loss + 0.1 * loss.item() if step else loss.item()
            if step % 10 == 0:
                log(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} KL {run_loss:.4f} ({time.time() - te:.0f} s)")
        curve.append({"epoch": epoch + 1, "loss": run_loss, "held_out_kl": held_kl(), "seconds": round(time.time() - te)})
        log(f"epoch {epoch + 1}: held-out KL {curve[-1]['held_out_kl']}")
        fit.save(epoch + 1)
    return curve


def train_mix(
    objectives: list[ObjectiveData],
    init: str | Path,
    out: str | Path,
    layers: int = 4,
    rank: int = 16,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 8,
    micro_batch: int = 8,
    seed: int = 0,
    chat_template: str | None = None,
    threads: int | None = None,
    distill: dict[str, Path] | None = None,
    candidates: int = 128,
    log=print,
) -> dict:
    """Train the gated-LoRA mix head on every objective's pairs; returns mix.json's record.
    `distill` ({objective: its ARM's peft adapter}): learn instead the separate ARMs' own mixture
    on the base's `candidates` likeliest tokens at every reply position (distill_loss)."""
    import torch
    from edge_genarm.export.sources import load_source
    from edge_genarm.export.train import encode_pairs, load_pairs

    if len(objectives) < 2:
        raise ConfigError("a mix head needs at least two objectives (one objective: train-arm)")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = load_source(init)
    if chat_template:
        tok.chat_template = chat_template
    n_layers = model.config.num_hidden_layers
    if not 1 <= layers < n_layers:
        raise ConfigError(f"--layers must be between 1 and {n_layers - 1}, got {layers}")
    k = n_layers - layers
    encs = []
    for spec in objectives:
        enc = encode_pairs(tok, load_pairs(spec.data), spec.max_len, "truncate")
        encs.append(enc)
        log(f"objective '{spec.name}': {len(enc)} pairs from {spec.data}")
    seqs, seq_index = [], {}
    for enc in encs:
        for p, w, lo in enc:
            for s in (tuple(p + w), tuple(p + lo)):
                if s not in seq_index:
                    seq_index[s] = len(seqs)
                    seqs.append(list(s))
    states = _cached_states(out, model, seqs, k, log)

    sd = model.state_dict()

    def get(name):
        return sd[name].detach().numpy()

    lw = []
    for i in range(k, n_layers):
        p = f"model.layers.{i}."
        L = {m: get(p + _HF[m] + ".weight").T for m in MATRICES}
        L["ln1"], L["ln2"] = get(p + "input_layernorm.weight"), get(p + "post_attention_layernorm.weight")
        lw.append(L)
    cfg = model.config
    lm = (get("lm_head.weight") if "lm_head.weight" in sd else get("model.embed_tokens.weight")).T
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2) / head_dim))
    scale = 2.0  # lora_alpha = 2r, as train-arm
    head = _head_class()(lw, get("model.norm.weight"), lm, inv_freq.astype(np.float32), float(cfg.rms_norm_eps),
                         cfg.num_attention_heads, cfg.num_key_value_heads, len(objectives), rank, scale)  # fmt: skip
    d = cfg.hidden_size
    objs = [_Objective(spec, enc, seq_index, seed) for spec, enc in zip(objectives, encs)]

    # the head with no LoRA is the base: check it against the HF model on one sequence
    with torch.no_grad():
        s = seqs[0]
        ref = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), -1)
        got = torch.log_softmax(head(states[0].float()[None], None)[0] @ head.lm, -1)
        kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    log(f"head (no LoRA) vs the HF model on {len(s)} positions: KL {kl:.2e}")
    if kl > 1e-3:
        raise ConfigError(f"the mix head's layers do not reproduce the model (KL {kl:.3g}): unsupported architecture")
    spans = [0] * len(seqs)  # each sequence's prompt length
    for enc in encs:
        for p, w, lo in enc:
            spans[seq_index[tuple(p + w)]] = spans[seq_index[tuple(p + lo)]] = len(p)
    targets = None
    if distill:
        missing = [o.spec.name for o in objs if o.spec.name not in distill]
        if missing:
            raise ConfigError(f"--distill needs every objective's ARM adapter; none for {', '.join(missing)}")

        def make(first, r, sc):
            return _head_class()(layer_weights(sd, first, n_layers), get("model.norm.weight"), lm,
                                 inv_freq.astype(np.float32), float(cfg.rms_norm_eps), cfg.num_attention_heads,
                                 cfg.num_key_value_heads, 1, r, sc)  # fmt: skip

        teachers = [teacher_head(make, Path(distill[o.spec.name]), n_layers) for o in objs]
        firsts = {f for f, _ in teachers}
        if len(firsts) != 1:
            raise ConfigError(f"the ARMs' adapters start at different layers ({sorted(firsts)}): distill them one by one")
        kt = firsts.pop()
        states_t = _cached_states(out, model, seqs, kt, log)
        log(f"teacher targets: the {len(teachers)} ARMs (layers {kt}-{n_layers - 1}) at every reply position")
        targets = teacher_targets(states_t, seqs, spans, [t for _, t in teachers], [int(tok.eos_token_id)], candidates, log)
        del states_t, teachers
        settings_extra = {"distill": {o.spec.name: str(distill[o.spec.name]) for o in objs}, "candidates": candidates,
                          "teacher_first_layer": kt}  # fmt: skip
    del model
    sd = None  # the head holds its own copies

    with torch.no_grad():  # the reference margins: the head with no LoRA (the init)
        for o in objs:
            if o.spec.reference:
                for s0 in range(0, len(o.pairs), micro_batch):
                    idx = list(range(s0, min(len(o.pairs), s0 + micro_batch)))
                    for i, m in zip(idx, o.margins(head, states, idx, None, d).tolist()):
                        o.pairs[i][5] = m
    settings = {
        "objectives": [o.spec.name for o in objs], "layers": layers, "first_layer": k, "rank": rank,
        "scale": scale, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "per_objective": {o.spec.name: {"data": str(o.spec.data), "beta_r": o.spec.beta_r, "reference": o.spec.reference,
                                        "max_len": o.spec.max_len, "eval_frac": o.spec.eval_frac,
                                        "pairs": len(o.pairs), "held_out": len(o.held)} for o in objs},
    }  # fmt: skip
    if distill:
        settings.update(settings_extra)
    if distill:
        curve = _fit_distill(head, objs, seqs, spans, targets, states, d, settings, epochs, lr, batch_size, seed, out, log)
    else:
        curve = _fit_pairs(head, objs, states, d, settings, epochs, lr, batch_size, micro_batch, seed, out, log)
    _round_fp16(head)
    held = {}
    n = len(objs)
    points = {"vertex " + o.spec.name: [float(j == i) for j in range(n)] for i, o in enumerate(objs)}
    points["even"] = [1.0 / n] * n
    for label, a in points.items():
        held[label] = {o.spec.name: _accuracy(o, head, states, torch.tensor(a), d) for o in objs}
    init_acc = {o.spec.name: _accuracy(o, head, states, None, d) for o in objs}
    info = {**settings, "held_out": held, "held_out_init": init_acc, "curve": curve,
            "seconds": round(time.time() - t0, 1)}  # fmt: skip
    save_mix(head, out, info)
    log(f"mix head: {json.dumps(held)}")
    return info
