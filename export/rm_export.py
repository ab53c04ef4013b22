"""`edge-genarm export rm`: a trained reward model -> ONNX with KV cache -> the bundle's `reward_models`.

The reward model's score head sits where an LM head would (export/train_rm.py), so optimum's
text-generation-with-past export gives a graph whose logits [batch, seq, 1] are the reward of
every prefix, with past key/values: the runtime runs it with the ARM backend (KVGraph), no
torch. Then the same steps as `export arm`: the compact graph (export/compact.py), parity
against PyTorch through prefill + single steps, optional weight-only quantization gated on the
held-out pairs the model was trained with, and an atomic manifest update:

    "reward_models": {NAME: {"kind": "rm", "file": "reward_models/NAME/model.onnx",
                             "tokens": "reward_models/NAME/tokens.json", "output": "logits[..., 0]",
                             "graph", "quantize", "parity", "gate", "training", "source", ...}}
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from edge_genarm.export.bundle_write import add_graph
from edge_genarm.export.commands import source_fingerprint
from edge_genarm.export.parity import PROMPTS, exported_logits, reference_logits
from edge_genarm.export.train_rm import RM_INFO, load_rm

from edge_genarm.baselines import RM_SECTION
from edge_genarm.errors import BundleError, ConfigError
from edge_genarm.gguf import read_gguf
from edge_genarm.manifest import MANIFEST, read_manifest
from edge_genarm.tokens import check_token_ids

PARITY_REPLY = " Thanks, that sounds lovely! I will write back soon."
MAX_PARITY_DIFF = 1e-3  # fp32: max |r_onnx - r_torch| over every position, relative to max(1, max |r|)


def export_rm_onnx(lm, tok, dst: Path) -> Path:
    """optimum's text-generation-with-past export of the in-memory model (+ tokens.json)."""
    from edge_genarm.export.onnx_export import _externalize, tokens_from_hf_tokenizer
    from optimum.exporters.onnx import onnx_export_from_model

    part = dst.with_name(dst.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    lm.config.use_cache = True
    try:
        onnx_export_from_model(lm, part, task="text-generation-with-past", do_validation=False, device="cpu")
    except Exception as e:
        shutil.rmtree(part, ignore_errors=True)
        raise BundleError(f"optimum could not export the reward model to ONNX: {e}") from e
    _externalize(part / "model.onnx")
    (part / "tokens.json").write_text(json.dumps(tokens_from_hf_tokenizer(tok), ensure_ascii=False))
    shutil.rmtree(dst, ignore_errors=True)
    part.rename(dst)
    return dst / "model.onnx"


def rm_parity(lm, tok, backend) -> dict:
    """The ONNX rewards at every reply position (prefill, then one step per token) against PyTorch's."""
    ref, got = [], []
    for text in PROMPTS:
        p = tok(text, add_special_tokens=True).input_ids
        ids = p + tok(PARITY_REPLY, add_special_tokens=False).input_ids
        ref.append(reference_logits(lm, ids)[len(p) - 1 :, 0])
        got.append(exported_logits(backend, ids, len(p))[:, 0])
    ref, got = np.concatenate(ref), np.concatenate(got)
    scale = max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ref - got).max())
    return {"type": "f32", "max_abs_diff": diff, "scale": scale, "positions": int(ref.size),
            "passed": diff <= MAX_PARITY_DIFF * scale}  # fmt: skip


def export_rm(
    source: str | Path,
    out: str | Path,
    name: str,
    quantize: str | None = None,
    block_size: int = 32,
    accuracy_level: int = 4,
    pairs: str | Path | None = None,
    force: bool = False,
) -> dict:
    """Export the reward-model folder SOURCE (train-rm's output) into bundle `out` as `name`."""
    from edge_genarm.export.compact import compact_file

    from edge_genarm.backends.onnx_arm import OnnxARM

    source, out = Path(source), Path(out)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise ConfigError(
            f"reward model name {name!r}: use letters, digits, '_', '-' or '.', e.g. --name sentiment"
        )
    if quantize:
        from edge_genarm.export.quantize import check_options

        check_options(quantize, block_size, accuracy_level)
    if not (out / MANIFEST).is_file():
        raise BundleError(f"'{out}' has no bundle yet: run `edge-genarm export base SOURCE -o {out}` first")
    fp = source_fingerprint(source) + (f"|{quantize}" if quantize else "")
    old = read_manifest(out).get(RM_SECTION, {}).get(name)
    if old and old.get("source", {}).get("fingerprint") == fp and not force:
        print(f"reward model '{name}' is already exported from this source: skipping (--force to redo)",
              file=sys.stderr)  # fmt: skip
        return read_manifest(out)
    lm, tok = load_rm(source)
    base = read_manifest(out)["base"]["file"]
    check_token_ids(name, _hf_tokens(tok), read_gguf(out / base).tokens, base, kind="reward model")  # before the slow part
    info = _training_info(source)
    spec = _pair_spec(source, info, pairs) if quantize else None
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        onnx_dir = Path(tmp) / "onnx"
        export_rm_onnx(lm, tok, onnx_dir)
        form = compact_file(onnx_dir / "model.onnx")
        parity = rm_parity(lm, tok, OnnxARM(onnx_dir / "model.onnx", name, cache=False))
        print(f"parity reward model '{name}': max |dr| {parity['max_abs_diff']:.2e} over "
              f"{parity['positions']} positions: {'passed' if parity['passed'] else 'FAILED'}", file=sys.stderr)  # fmt: skip
        if not parity["passed"]:
            raise BundleError(f"the ONNX export of '{source}' failed parity: not added to the bundle")
        gate = (
            _quantize_gated(out, name, onnx_dir, quantize, block_size, accuracy_level, spec)
            if quantize
            else None
        )
        extra = {
            "source": {"path": str(source.resolve()), "fingerprint": fp},
            "parity": parity,
            **({"gate": gate} if gate else {}),
            "graph": form,
            "quantize": quantize,
            "n_layers": lm.config.num_hidden_layers,
            "n_params": int(sum(p.numel() for p in lm.parameters())),
            **({"training": info} if info else {}),
        }
        return add_reward_model(out, onnx_dir, name, extra)


def _hf_tokens(tok) -> list[str]:
    from edge_genarm.export.onnx_export import tokens_from_hf_tokenizer

    return tokens_from_hf_tokenizer(tok)


def _training_info(source: Path) -> dict | None:
    p = source / RM_INFO
    return json.loads(p.read_text()) if p.is_file() else None


def _pair_spec(source: Path, info: dict | None, pairs) -> dict:
    """Where the quantization gate's held-out pairs come from: train-rm's record, or --pairs."""
    info = info or {}
    data = Path(pairs) if pairs else Path(info["data"]) if info.get("data") else None
    if data is None or not data.is_file():
        raise ConfigError(
            f"quantizing reward model '{source}' is gated on its held-out pairs, and "
            f"{'the pair file ' + repr(str(data)) + ' does not exist' if data else 'none are recorded'}: "
            "pass --pairs PAIRS.jsonl (the file it was trained on)"
        )
    return {"data": data, "max_len": info.get("max_len", 512), "eval_frac": info.get("eval_frac", 0.1),
            "seed": info.get("seed", 0)}  # fmt: skip


def _quantize_gated(
    out: Path, name: str, onnx_dir: Path, kind: str, block_size, accuracy_level, spec
) -> dict:
    """Quantize onnx_dir/model.onnx in place when it keeps the held-out preference accuracy."""
    import functools

    import onnx
    from edge_genarm.export.gate import heldout_pairs
    from edge_genarm.export.onnx_io import gate_then_swap
    from edge_genarm.export.quantize import quantize_model

    seqs = heldout_pairs(out, spec["data"], spec["max_len"], spec["eval_frac"], spec["seed"])
    if not seqs:
        raise ConfigError(
            f"reward model '{name}' has no held-out pairs to gate quantization: train with --eval-frac > 0"
        )
    q = quantize_model(onnx.load(str(onnx_dir / "model.onnx")), kind, block_size, accuracy_level,
                       f"reward model '{name}'")  # fmt: skip
    judge = functools.partial(_accuracy_gate, name, seqs, dict(type=kind, block_size=block_size,
                                                               accuracy_level=accuracy_level))  # fmt: skip
    return gate_then_swap(onnx_dir, q, judge)


def _accuracy_gate(name: str, seqs: list, record: dict, fp32: Path, quantized: Path) -> dict:
    """The held-out preference accuracy of the quantized reward model against the fp32 one:
    the gate record, or BundleError when it loses more than the gate allows."""
    from edge_genarm.export.gate import max_drop_text, within_gate

    from edge_genarm.backends.onnx_arm import OnnxARM

    graphs = {"fp32": OnnxARM(fp32, name, threads=2, cache=False),
              "quantized": OnnxARM(quantized, name, threads=2, cache=False)}  # fmt: skip
    r = {k: np.array([[g.sequence_logits(p + y)[-1, 0] for y in (w, lo)] for p, w, lo in seqs])
         for k, g in graphs.items()}  # fmt: skip
    acc = {k: float(np.mean(v[:, 0] > v[:, 1])) for k, v in r.items()}
    g = {**record, "pairs": len(seqs),
         "accuracy_fp32": acc["fp32"], "accuracy_quantized": acc["quantized"],
         "accuracy_drop": acc["fp32"] - acc["quantized"],
         "score_correlation": float(np.corrcoef(r["fp32"].ravel(), r["quantized"].ravel())[0, 1])}  # fmt: skip
    g["passed"] = within_gate(g["accuracy_drop"], len(seqs))
    line = (f"gate reward model '{name}' ({record['type']}): held-out accuracy {acc['fp32']:.3f} fp32 -> "
            f"{acc['quantized']:.3f} on {len(seqs)} pairs ({max_drop_text()}), score correlation "
            f"{g['score_correlation']:.4f}: {'passed' if g['passed'] else 'REFUSED'}")  # fmt: skip
    print(line, file=sys.stderr)
    if not g["passed"]:
        raise BundleError(f"{line}: reward model '{name}' not added, the bundle is unchanged")
    return g


def add_reward_model(root: str | Path, onnx_dir: str | Path, name: str, extra: dict | None = None) -> dict:
    """Copy an exported reward-model folder (model.onnx [+ data], tokens.json) into the bundle's
    `reward_models/NAME/` and record it in the manifest (after the tokenizer check)."""
    entry = {"kind": "rm", "output": "logits[..., 0]: the reward of the sequence up to each position", **(extra or {})}
    return add_graph(root, onnx_dir, RM_SECTION, name, entry, kind="reward model")
