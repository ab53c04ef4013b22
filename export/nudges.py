"""`edge-genarm export nudges`: reward-gradient directions, computed once, at export time.

For calibration prompts, the bundle's base writes responses (through the runtime,
recording each step's entropy). The reward model reads prompt + response as
embeddings; the gradient of its reward with respect to the embedding at each
high-entropy response position (the positions that will trigger at run time) is
what GGRO would compute on the fly. Its normalised average is the direction d,
and the table stores <d, E[v]> for every token v: globally, and per cluster of
contexts (k-means on a low-rank feature of the recent tokens) when asked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from edge_genarm.export.bundle_write import add_file

from edge_genarm.errors import ConfigError
from edge_genarm.gguf import read_gguf, vocab_fingerprint
from edge_genarm.manifest import read_manifest, write_manifest
from edge_genarm.nudge import NudgeTable
from edge_genarm.records import read_prompts
from edge_genarm.tokens import check_arm_tokens

NUDGE_FILE = "nudges.npz"


def load_reward_model(source: str | Path):
    """(model, tokenizer, kind): a sequence classifier ('classifier') or a causal LM ('arm')."""
    from edge_genarm.export.sources import load_source
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = Path(source)
    cfg = src / "config.json"
    if src.is_dir() and cfg.is_file():
        arch = " ".join(json.loads(cfg.read_text()).get("architectures") or [])
        if "SequenceClassification" in arch:
            model = AutoModelForSequenceClassification.from_pretrained(src, dtype="float32").eval()
            return model, AutoTokenizer.from_pretrained(src), "classifier"
    model, tok = load_source(src)
    return model, tok, "arm"


def reward(model, kind: str, emb, n_prompt: int, targets):
    """Classifier: its first logit. ARM: sum of the response tokens' log-probs."""
    import torch

    out = model(inputs_embeds=emb[None]).logits[0]
    if kind == "classifier":
        return out[0]
    return torch.log_softmax(out[n_prompt - 1 : -1], -1).gather(-1, targets[:, None]).sum()


def site_gradients(model, kind: str, ids: list[int], n_prompt: int, sites: list[int]) -> np.ndarray:
    """Unit gradients d reward / d embedding at response positions `sites` (0 = first response token)."""
    import torch

    E = model.get_input_embeddings().weight
    emb = E[torch.tensor(ids)].detach().clone().requires_grad_(True)
    reward(model, kind, emb, n_prompt, torch.tensor(ids[n_prompt:])).backward()
    g = emb.grad[[n_prompt + s for s in sites]].double().numpy()
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Plain Lloyd's k-means: (centroids [k, r], labels [n])."""
    rng = np.random.default_rng(seed)
    c = x[rng.choice(len(x), size=k, replace=False)].copy()
    for _ in range(iters):
        labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        new = np.stack([x[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c, labels


def export_nudges(
    bundle: str | Path,
    source: str | Path,
    calibration: str | Path,
    n_prompts: int = 32,
    max_tokens: int = 48,
    clusters: int = 0,
    rank: int = 32,
    tau: float = 1.5,
    seed: int = 0,
) -> dict:
    import edge_genarm

    bundle = Path(bundle)
    base_tokens = read_gguf(bundle / read_manifest(bundle)["base"]["file"]).tokens
    model, tok, kind = load_reward_model(source)
    from edge_genarm.export.onnx_export import tokens_from_hf_tokenizer

    check_arm_tokens("reward model", tokens_from_hf_tokenizer(tok), base_tokens, "base")
    prompts = [p for _, p in read_prompts(calibration)[:n_prompts]]
    engine = edge_genarm.load(str(bundle), arms=[])
    E = model.get_input_embeddings().weight.detach().double().numpy()[: len(base_tokens)]
    proj = _low_rank(E, rank) if clusters else None
    grads, feats = [], []
    for i, p in enumerate(prompts):
        c = engine.generate(
            p, seed=seed + i, max_tokens=max_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0
        )
        prompt_ids = engine.tokenize_prompt(engine.format_prompt(p))
        ids = prompt_ids + c.tokens
        sites = [j for j, r in enumerate(c.records) if r.entropy >= tau] or list(range(len(c.records)))
        if not c.tokens or not sites:
            continue
        grads.append(site_gradients(model, kind, ids, len(prompt_ids), sites))
        if proj is not None:
            feats += [proj[ids[max(0, len(prompt_ids) + s - 8) : len(prompt_ids) + s]].mean(0) for s in sites]
        print(
            f"\rnudges: {i + 1}/{len(prompts)} prompts, {sum(len(g) for g in grads)} sites",
            end="",
            file=sys.stderr,
        )
    print(file=sys.stderr)
    if not grads:
        raise ConfigError("no calibration responses were produced: check the prompts file")
    g = np.concatenate(grads)
    dirs = [g.mean(0)]
    centroids = None
    if clusters:
        centroids, labels = kmeans(np.stack(feats), min(clusters, len(feats)), seed)
        dirs += [g[labels == j].mean(0) if np.any(labels == j) else dirs[0] for j in range(len(centroids))]
    scores = np.stack([E @ d for d in dirs]).astype(np.float32)
    meta = {
        "n_vocab": len(base_tokens),
        "vocab_fingerprint": vocab_fingerprint(base_tokens),
        "reward_source": str(Path(source).resolve()),
        "reward_kind": kind,
        "tau": tau,
        "n_prompts": len(prompts),
        "n_sites": int(len(g)),
        "clusters": int(len(dirs) - 1),
    }
    table = NudgeTable(scores, proj.astype(np.float32) if proj is not None else None, centroids, meta)
    table.save(bundle / NUDGE_FILE)
    m = read_manifest(bundle)
    m["nudges"] = {"file": NUDGE_FILE, **meta}
    add_file(bundle, m, NUDGE_FILE)
    write_manifest(bundle, m)
    return meta


def _low_rank(E: np.ndarray, rank: int) -> np.ndarray:
    """Token features: E projected on its top `rank` principal directions."""
    Ec = E - E.mean(0)
    _, _, vt = np.linalg.svd(Ec[:: max(1, len(Ec) // 8192)], full_matrices=False)
    return (Ec @ vt[:rank].T).astype(np.float32)
