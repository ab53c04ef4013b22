"""`python -m edge_genarm.export.record_pack NAME`: record a built pack with its recipe
(recorded.json, heldout.json, nudges.npz; export/pack_record.py says what each holds), so a
build whose files hash the same copies the gate figures instead of measuring them again.

Kept apart from pack_record.py: it reads the pack cache (edge_genarm.pack), which imports the
build path that imports pack_record.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edge_genarm.export.pack_record import HELDOUT, NUDGES, RECORD, load_records, record_heldout, versions  # noqa: F401

from edge_genarm.errors import EdgeGenarmError
from edge_genarm.paths import atomic_write_json


def record_pack(name: str) -> Path:
    """Write NAME's recorded.json (+ heldout.json, nudges.npz) from its built pack in the cache."""
    import shutil

    from edge_genarm.pack import built_bundle, load_recipe

    recipe = load_recipe(name)
    bundle = built_bundle(name)
    if bundle is None:
        raise EdgeGenarmError(f"pack '{name}' is not built: `edge-genarm pack build {name}` first")
    m = json.loads((bundle / "manifest.json").read_text())
    d = Path(recipe["_dir"])
    record_heldout(recipe, bundle)
    if "nudges" in m:
        shutil.copyfile(bundle / m["nudges"]["file"], d / NUDGES)
    (trunk,) = m.get("trunks", {}).values() or [{}]
    record = {
        "note": "written by `python -m edge_genarm.export.record_pack`: a build whose files hash the same "
        "copies these figures instead of measuring them (export/lean_pack.py)",
        "versions": versions(),
        "files": {rel: r["sha256"] for rel, r in m["files"].items()},
        "share": {k: trunk.get(k) for k in ("quantize", "heads_quantize", "lm_head_quantize", "embedding_quantize")},
        "gates": {arm: a.get("gate") for arm, a in m["arms"].items()},
        "parity": {arm: a.get("parity") for arm, a in m["arms"].items()},
        "base_tap": trunk.get("base_tap"),
        "nudges": {k: v for k, v in m.get("nudges", {}).items() if k != "reward_source"} or None,
    }
    # the builds recorded on machines whose quantizer wrote other bytes stay beside this one
    others = [r for r in load_records(recipe)
              if any(r.get("files", {}).get(k) not in (None, v) for k, v in record["files"].items())]  # fmt: skip
    atomic_write_json(d / RECORD, {"note": record["note"], "builds": [record, *others]} if others else record)
    return d / RECORD


if __name__ == "__main__":
    print(record_pack(sys.argv[1] if len(sys.argv) > 1 else "default"))
