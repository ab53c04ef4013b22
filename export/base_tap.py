"""`edge-genarm export base-tap`: may the heads of a shared trunk run on the base's own layers?

The default pack's ARMs start from the base's own weights (the GGUF dequantized) and carry
adapters on their last layers only, so their shared trunk computes what the base's first
layers compute while it decodes, up to llama.cpp's quantized arithmetic (Q4_1 weights,
8-bit activations). Reading the base's layer output (backends.capture) instead of running
the trunk graph makes the trunk free; this gate measures what that rounding costs before
a bundle allows it:

- per ARM, on its held-out preference pairs (the split train-arm held out): preference
  accuracy with the trunk graph and on the base's layer, KL(graph || base tap) and top-1
  agreement of the ARM's next-token distribution over the response positions;
- the hidden states themselves: cosine and relative error against the trunk graph's.

It passes when every ARM's accuracy on the base tap is within 0.02 of its fp32 accuracy
(as recorded by the share-trunk gate; else of the trunk graph's), the same rule as
quantization. The result is recorded under the trunk's `base_tap` in the manifest, with the
base file's sha256: the loader taps only that base. A failed gate is recorded too (the loader
then keeps the trunk graph), and nothing else in the bundle changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edge_genarm.errors import BundleError
from edge_genarm.manifest import read_manifest, write_manifest

KL_PAIRS = 16


def _hidden_drift(base, trunk, seqs) -> dict:
    cos, rel = [], []
    for p, w, _ in seqs:
        ids = list(p) + list(w)
        trunk.reset()
        ref = trunk.feed(ids).astype(np.float64)
        base.reset()
        base.prefill(ids)
        got = base.hidden.astype(np.float64)
        cos.extend(np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1)))
        rel.extend(np.linalg.norm(ref - got, axis=-1) / np.linalg.norm(ref, axis=-1))
    return {
        "hidden_cos_mean": float(np.mean(cos)),
        "hidden_cos_min": float(np.min(cos)),
        "hidden_rel_err_mean": float(np.mean(rel)),
        "positions": len(cos),
    }


def _gate(name, graph, on_base, seqs, share_gate: dict) -> dict:
    """The share-trunk gate's figures for the base tap: accuracy on every held-out pair; KL and
    top-1 against the trunk graph on the first KL_PAIRS (the graph's own accuracy is the share
    gate's record when there is one: scoring every pair twice doubled the pack build's time)."""
    from edge_genarm.export.gate import _response_lp, gate, pair_margin, reward_kind

    recorded = share_gate.get("accuracy_quantized")
    known = (
        isinstance(recorded, (int, float))
        and share_gate.get("pairs") == len(seqs)
        and share_gate.get("reward", "summed log-prob") == reward_kind(seqs)  # scored the same way
    )
    wins = sum(
        int(pair_margin(_response_lp(on_base.sequence_logits(name, e[0] + e[1]), len(e[0]), e[1])[0],
                        _response_lp(on_base.sequence_logits(name, e[0] + e[2]), len(e[0]), e[2])[0], e) > 0)
        for e in seqs
    )  # fmt: skip
    kl = gate(
        lambda ids: graph.sequence_logits(name, ids),
        lambda ids: on_base.sequence_logits(name, ids),
        seqs if not known else seqs[:KL_PAIRS],
    )
    g = {
        "pairs": len(seqs),
        "accuracy_graph": recorded if known else kl["accuracy_fp32"],
        "accuracy_base_tap": wins / max(1, len(seqs)),
        "mean_kl": kl["mean_kl"],
        "top1_agreement": kl["top1_agreement"],
        "kl_pairs": kl["pairs"],
        "reward": kl["reward"],
    }
    fp32 = share_gate.get("accuracy_fp32")
    g["accuracy_fp32"] = fp32 if known and isinstance(fp32, (int, float)) else g["accuracy_graph"]
    return g


def base_tap(
    bundle: str | Path,
    pairs: dict | None = None,
    trunk_key: str | None = None,
    threads: int | None = None,
    log=lambda s: print(s, file=sys.stderr),
    seqs: dict | None = None,
    probe: list | None = None,
) -> dict:
    """Gate and record the base tap for `trunk_key` (default: the bundle's only trunk).
    `pairs`: {ARM name: share.PairSpec}; an ARM without pairs is measured on the parity
    prompts (KL and top-1 only, passing at top-1 >= 0.9). `threads`: for the base and the graphs
    (default: the runtime's, `default_threads()`). `seqs` ({ARM: held-out pairs as token ids}) and
    `probe` (the parity prompts' ids) replace tokenizing them (the torch-free build recorded
    them). Returns the record."""
    from edge_genarm.export.gate import heldout_pairs, within_gate
    from edge_genarm.export.share import probe_sequences

    from edge_genarm.backends.llama_base import LlamaBase, default_threads
    from edge_genarm.backends.trunk import TrunkGroup

    bundle, threads = Path(bundle), threads or default_threads()
    m = read_manifest(bundle)
    trunks = m.get("trunks", {})
    if trunk_key is None:
        if len(trunks) != 1:
            have = ", ".join(trunks) or "none"
            raise BundleError(f"'{bundle}' has {len(trunks)} shared trunks ({have}): name one with --trunk-id")
        trunk_key = next(iter(trunks))
    if trunk_key not in trunks:
        raise BundleError(f"'{bundle}' has no shared trunk '{trunk_key}' (have: {', '.join(trunks) or 'none'})")
    t = trunks[trunk_key]
    heads = {n: bundle / a["file"] for n, a in m["arms"].items() if a.get("trunk") == trunk_key}
    base_file = m["base"]["file"]
    base_sha = m.get("files", {}).get(base_file, {}).get("sha256")
    layer = int(t["layers"]) - 1
    if layer < 0 or not base_sha:
        raise BundleError(f"trunk '{trunk_key}' of '{bundle}' cannot run on the base (layers {t['layers']})")
    base = LlamaBase(bundle / base_file, n_ctx=2048, threads=threads, tap=layer)
    n_layers_base = int(base.info.arch_get("block_count", 0) or 0)
    if n_layers_base and n_layers_base != t.get("n_layers", n_layers_base):
        raise BundleError(
            f"trunk '{trunk_key}' comes from a {t.get('n_layers')}-layer model, the base '{base_file}' has "
            f"{n_layers_base} layers: its heads cannot run on this base"
        )
    kw = dict(threads=threads, cache=False)
    graph = TrunkGroup(bundle / t["file"], heads, bundle / t["lm_head"], **kw)
    on_base = TrunkGroup(bundle / t["file"], heads, bundle / t["lm_head"], on_base=True, **kw)
    on_base.attach(base)
    gates, record = {}, {"layer": layer, "node": f"l_out-{layer}", "base_sha256": base_sha}
    for n in heads:
        spec = (pairs or {}).get(n)
        training = m["arms"][n].get("training")
        given = (seqs or {}).get(n)
        held = (
            heldout_pairs(bundle, spec.data, spec.max_len, spec.eval_frac, spec.seed, training)
            if spec and given is None
            else given
        )
        g = _gate(n, graph, on_base, held or probe or probe_sequences(bundle), (m["arms"][n].get("gate") or {}))
        if held:
            g["accuracy_drop"] = g["accuracy_fp32"] - g["accuracy_base_tap"]
            g["passed"] = within_gate(g["accuracy_drop"], g["pairs"])
        else:
            g.update(accuracy_drop=None, passed=g["top1_agreement"] >= 0.9, pairs=0)
        gates[n] = g
        log(_format(n, g))
    if not heads:
        raise BundleError(f"no ARM of '{bundle}' is a head on trunk '{trunk_key}'")
    record.update(_hidden_drift(base, graph.trunk, probe or probe_sequences(bundle)))  # the graph group's own trunk
    record["gates"] = gates
    record["passed"] = all(g["passed"] for g in gates.values())
    log(
        f"base tap (layer {layer}): hidden states vs the trunk graph: cosine {record['hidden_cos_mean']:.4f} "
        f"mean ({record['hidden_cos_min']:.4f} min), relative error {record['hidden_rel_err_mean']:.3f}: "
        + ("passed: heads run on the base's own layers" if record["passed"] else "REFUSED: the trunk graph stays")
    )
    m = read_manifest(bundle)  # re-read: write only our record
    m["trunks"][trunk_key]["base_tap"] = record
    write_manifest(bundle, m)
    return record


def _format(name: str, g: dict) -> str:
    from edge_genarm.export.gate import _relative, max_drop_text

    acc = (
        f"held-out preference accuracy{_relative(g)} {g['accuracy_fp32']:.3f} fp32, "
        f"{g['accuracy_graph']:.3f} trunk graph -> "
        f"{g['accuracy_base_tap']:.3f} on the base's layer, {g['pairs']} pairs (drop {g['accuracy_drop']:+.3f}, "
        f"{max_drop_text()}); "
        if g["pairs"]
        else ""
    )
    return (
        f"base tap, ARM '{name}': {acc}KL {g['mean_kl']:.3e}, top-1 {g['top1_agreement']:.3f}: "
        f"{'passed' if g['passed'] else 'REFUSED'}"
    )
