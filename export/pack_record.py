"""What a pack recipe records of its own build, so that users' builds need not measure it again.

    models/NAME-pack/recorded.json   the sha256 of every file the build wrote, the quantization the
                                     shared trunk kept, the gate figures and the base-tap record
                                     measured then, and the versions that wrote them
    models/NAME-pack/heldout.json    each ARM's held-out pairs (and probe prompts) as token ids, so
                                     the gates run without a tokenizer library
    models/NAME-pack/nudges.npz      the nudge table (reward gradients need torch: computed once)

`python -m edge_genarm.export.record_pack NAME` writes them from the pack built in the cache
(`edge-genarm pack build NAME`); it needs the export extra (the held-out pairs are tokenized
as training tokenized them). A build compares its files with the record (lean_pack.py): the
same bytes skip the gates and copy the figures, marked "recorded": true.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_genarm.bundle import sha256_file
from edge_genarm.errors import EdgeGenarmError
from edge_genarm.paths import atomic_write_json

RECORD, HELDOUT, NUDGES = "recorded.json", "heldout.json", "nudges.npz"
VERSIONED = ("numpy", "onnx", "onnxruntime", "gguf")  # what writes or judges the files


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def load_records(recipe: dict) -> list[dict]:
    """The builds the recipe records, newest first: one per set of file bytes (onnxruntime's
    quantizer writes other bytes on some CPUs, so one recipe can have several)."""
    p = Path(recipe["_dir"]) / RECORD
    if not p.is_file():
        return []
    data = json.loads(p.read_text())
    return list(data["builds"]) if "builds" in data else [data]




def pair_source(recipe: dict, arm: str) -> dict:
    """What an ARM's held-out split depends on: the pair file's sha256 and the split settings."""
    s = recipe["arms"][arm]
    return {
        "data_sha256": sha256_file(Path(recipe["_dir"]) / s["data"]),
        "max_len": s.get("max_len", 256),
        "eval_frac": s.get("eval_frac", 0.1),
        "seed": s.get("seed", 0),
    }


def heldout_seqs(recipe: dict, arm: str, bundle: Path, training: dict | None) -> list[tuple]:
    """ARM `arm`'s held-out pairs as the gates score them: the recorded token ids when they were
    recorded from the same pair file and split, else tokenized now (needs transformers)."""
    from edge_genarm.export.gate import heldout_pairs, reference_margins

    p = Path(recipe["_dir"]) / HELDOUT
    rec = json.loads(p.read_text()).get("arms", {}).get(arm) if p.is_file() else None
    if rec is not None and rec["source"] == pair_source(recipe, arm):
        held = [tuple(list(x) for x in e) for e in rec["pairs"]]
        margins = reference_margins(training, len(held))
        return [(*e, m) for e, m in zip(held, margins)] if margins is not None else held
    try:
        import transformers  # noqa: F401
    except ImportError:
        why = "records no held-out token ids" if rec is None else "records token ids of another pair file or split"
        raise EdgeGenarmError(
            f"the recipe {p.parent.name} {why} for ARM '{arm}' ({p}), and tokenizing the pairs needs "
            "the export extra: pip install 'edge-genarm[export]', or record them "
            f"(python -m edge_genarm.export.record_pack {p.parent.name[: -len('-pack')]})"
        ) from None
    s = recipe["arms"][arm]
    data = Path(recipe["_dir"]) / s["data"]
    return heldout_pairs(bundle, data, s.get("max_len", 256), s.get("eval_frac", 0.1), s.get("seed", 0), training)


def probe_seqs(recipe: dict, bundle: Path) -> list[tuple]:
    """The parity prompts as (first 2 ids, rest, rest): recorded, else tokenized (share.probe_sequences)."""
    p = Path(recipe["_dir"]) / HELDOUT
    if p.is_file() and "probe" in json.loads(p.read_text()):
        return [tuple(list(x) for x in e) for e in json.loads(p.read_text())["probe"]]
    from edge_genarm.export.share import probe_sequences

    return probe_sequences(bundle)


def record_heldout(recipe: dict, bundle: Path) -> Path:
    """heldout.json: each ARM's held-out pairs and the probe prompts as token ids (any bundle with
    the recipe's base will do: only its tokenizer is read)."""
    from edge_genarm.export.gate import heldout_pairs
    from edge_genarm.export.share import probe_sequences

    d = Path(recipe["_dir"])
    held = {"arms": {}, "probe": [list(map(list, e)) for e in probe_sequences(bundle)]}
    for arm, s in recipe["arms"].items():
        pairs = heldout_pairs(bundle, d / s["data"], s.get("max_len", 256), s.get("eval_frac", 0.1), s.get("seed", 0))
        held["arms"][arm] = {"source": pair_source(recipe, arm), "pairs": [list(map(list, e)) for e in pairs]}
    atomic_write_json(d / HELDOUT, held)
    return d / HELDOUT
