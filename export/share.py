"""`edge-genarm export share-trunk`: sibling ARMs of a bundle -> one trunk, a head each, one LM head.

Optionally weight-quantized (int4/int8), then gated: each ARM's pieces against its own fp32
graph on held-out preference pairs (export/gate.py). Bundle layout afterwards:

    trunks/<sha>/trunk.onnx, trunks/<sha>/lmhead.onnx    shared
    arms/<name>/head.onnx, arms/<name>/tokens.json       per ARM

Everything is written under a temporary folder inside the bundle and moved in only when
every ARM has passed; the manifest is replaced last, and the old full graphs are deleted
after it. A refused or interrupted run leaves the bundle as it was.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_genarm.export.bundle_write import file_record, scratch_dir, tidy_bundle

from edge_genarm.errors import BundleError
from edge_genarm.manifest import read_manifest, write_manifest


@dataclass
class PairSpec:
    """Where an ARM's held-out pairs come from (train-arm's data, max_len, eval_frac, seed)."""

    data: Path
    max_len: int = 256
    eval_frac: float = 0.1
    seed: int = 0


def _quantize_file(path: Path, kind: str, block_size: int, accuracy_level: int, embed_kind=None) -> None:
    import onnx
    from edge_genarm.export.onnx_io import save_model
    from edge_genarm.export.quantize import quantize_model

    model = quantize_model(
        onnx.load(str(path)), kind, block_size, accuracy_level, f"'{path.name}'", embed_kind, copy=False
    )
    save_model(model, path)


def probe_sequences(bundle: Path) -> list[tuple[list[int], list[int], list[int]]]:
    """Without pairs: the parity prompts, so KL and top-1 are still measured."""
    from edge_genarm.export.gguf_tokenizer import build_tokenizer
    from edge_genarm.export.parity import PROMPTS

    from edge_genarm.gguf import read_gguf

    tok = build_tokenizer(read_gguf(bundle / read_manifest(bundle)["base"]["file"]))
    out = []
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=False).input_ids
        out.append((ids[:2], ids[2:], ids[2:]))
    return out


def share_trunk(
    bundle: str | Path,
    names: list[str] | None = None,
    quantize: str | None = None,
    block_size: int = 32,
    accuracy_level: int = 4,
    pairs: dict[str, PairSpec] | None = None,
    log=lambda s: print(s, file=sys.stderr),
    lm_head: str | None = None,
    embedding: str | None = None,
    compact: bool = True,
    heads_quantize: str | None = None,
    layer: int | None = None,
) -> dict:
    """Rewrite ARMs `names` (default: every full-graph ARM) of `bundle` onto one shared trunk.

    `quantize` applies to the layers; `lm_head` and `embedding` (default: the same) to the LM
    head and the embedding lookup (4-bit only in onnxruntime: an int8 ARM keeps it fp32 unless
    `embedding="int4"`); `heads_quantize` (default: the same) to the heads' layers. `layer`: cut there (see
    plan_split; one ARM needs it: its trunk is then its own first layers, the base's)."""
    from edge_genarm.export.gate import format_gate, gate, heldout_pairs
    from edge_genarm.export.split import split_siblings

    from edge_genarm.backends.onnx_arm import OnnxARM
    from edge_genarm.backends.trunk import TrunkGroup

    bundle = Path(bundle)
    tidy_bundle(bundle)  # what a killed run left
    m = read_manifest(bundle)
    arms = m.get("arms", {})
    names = names or [n for n, a in arms.items() if "trunk" not in a]
    missing = [n for n in names if n not in arms or "trunk" in arms[n]]
    if missing or not names:
        have = ", ".join(n for n, a in arms.items() if "trunk" not in a) or "none"
        raise BundleError(
            f"no full-graph ARM named {missing or names} in '{bundle}' (full-graph ARMs: {have})"
        )
    full = {n: bundle / arms[n]["file"] for n in names}
    with scratch_dir(bundle, "share") as tmp:
        work = Path(tmp)
        plan, heads, form = split_siblings(full, work, compact, layer)
        log(
            f"trunk: layers 0-{plan.layer - 1} of {plan.n_layers} shared by {', '.join(names)} ({form} graphs)"
        )
        if quantize:
            lm = lm_head or quantize
            _quantize_file(
                work / "trunk.onnx", quantize, block_size, accuracy_level, embed_kind=embedding or lm
            )
            _quantize_file(work / "lmhead.onnx", lm, block_size, accuracy_level)
            for f in heads.values():
                _quantize_file(f, heads_quantize or quantize, block_size, accuracy_level)
        group = TrunkGroup(work / "trunk.onnx", heads, work / "lmhead.onnx", threads=2, cache=False)
        gates = {}
        for n in names:
            ref = OnnxARM(full[n], n, threads=2, cache=False)
            spec = (pairs or {}).get(n)
            seqs = (
                heldout_pairs(
                    bundle, spec.data, spec.max_len, spec.eval_frac, spec.seed, arms[n].get("training")
                )
                if spec
                else probe_sequences(bundle)
            )
            g = gate(ref.sequence_logits, lambda ids, n=n: group.sequence_logits(n, ids), seqs)
            if not spec:  # no preference pairs: only the distributions were compared
                g.update(accuracy_fp32=None, accuracy_quantized=None, accuracy_drop=None, pairs=0)
                g["passed"] = g["top1_agreement"] >= (0.999 if not quantize else 0.6)
                log(
                    f"gate ARM '{n}': KL {g['mean_kl']:.3e}, top-1 {g['top1_agreement']:.3f} (no pairs given)"
                )
            else:
                log(format_gate(n, g))
            g["type"] = quantize or "f32"
            gates[n] = g
        failed = [n for n, g in gates.items() if not g["passed"]]
        if failed:
            raise BundleError(
                f"ARM(s) {', '.join(failed)} failed the {quantize or 'f32'} gate: "
                + "; ".join(format_gate(n, gates[n]) if gates[n]["pairs"] else n for n in failed)
                + ": the bundle is unchanged; try --quantize int8, or no quantization"
            )
        kinds = {
            "graph": form,
            "quantize": quantize,
            "lm_head_quantize": (lm_head or quantize) if quantize else None,
            "heads_quantize": (heads_quantize or quantize) if quantize else None,
            # GatherBlockQuantized is 4-bit only: any other kind leaves the embedding fp32
            "embedding_quantize": "int4"
            if quantize and (embedding or lm_head or quantize) == "int4"
            else None,
        }
        return _install(bundle, m, plan, work, heads, gates, kinds, block_size, accuracy_level, full)


def _install(bundle, m, plan, work: Path, heads, gates, kinds, block_size, accuracy_level, full) -> dict:
    """Move the pieces in, then the manifest, then delete the full graphs they replace."""
    tdir = Path("trunks") / plan.trunk_sha
    dst = bundle / tdir
    dst.mkdir(parents=True, exist_ok=True)
    files = m.setdefault("files", {})
    for piece in ("trunk.onnx", "lmhead.onnx"):
        for f in work.glob(piece + "*"):
            shutil.move(str(f), dst / f.name)
            files[str(tdir / f.name)] = file_record(dst / f.name)
    m.setdefault("trunks", {})[plan.trunk_sha] = {
        "file": str(tdir / "trunk.onnx"),
        "lm_head": str(tdir / "lmhead.onnx"),
        "layers": plan.layer,
        "n_layers": plan.n_layers,
        **kinds,
        "block_size": block_size if kinds["quantize"] else None,
        "accuracy_level": accuracy_level if kinds["quantize"] else None,
    }
    old = []
    for n, src in heads.items():
        rel = Path(m["arms"][n]["file"]).parent / "head.onnx"
        for f in src.parent.glob("head.onnx*"):
            shutil.move(str(f), bundle / rel.parent / f.name)
            files[str(rel.parent / f.name)] = file_record(bundle / rel.parent / f.name)
        old += [p for p in full[n].parent.glob(full[n].name + "*")]
        for k in [k for k in files if k.startswith(m["arms"][n]["file"])]:
            del files[k]
        m["arms"][n].update(file=str(rel), trunk=plan.trunk_sha, gate=gates[n], trunk_layers=plan.layer)
    write_manifest(bundle, m)
    for p in old:
        p.unlink(missing_ok=True)
    return m
