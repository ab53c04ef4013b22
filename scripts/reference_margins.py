"""Add the init's held-out margins to a committed adapter's training record.

An ARM trained with `train-arm --reference` scores replies relative to its init, and the
export gates need the init's margins on the held-out pairs to score it the same way
(export/gate.py, `heldout_pairs`). train-arm records them (`heldout_reference_margins`);
adapters committed before it did lack them. This recomputes them exactly as training did
(the same encoding, split and batched forward, the LoRA adapters off), checks that the
adapter's accuracy beyond them is the recorded `heldout_accuracy`, and writes the record
back atomically.

    python scripts/reference_margins.py models/default-pack concise
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack", type=Path, help="A pack recipe folder (models/NAME-pack).")
    ap.add_argument("arm", help="The ARM whose committed adapter to complete.")
    a = ap.parse_args()

    import tomllib
    import torch
    from edge_genarm.export.sources import load_source
    from edge_genarm.export.train import encode_pairs, load_pairs, with_reference
    from edge_genarm.export.train_arm import arm_objective
    from edge_genarm.export.train_loop import evaluate, split
    from peft import PeftModel

    from edge_genarm.paths import atomic_write_json
    from tests.tiny import smollm2_gguf  # the checkout's test fixtures: ROOT is on sys.path

    torch.set_num_threads(1)
    spec = tomllib.loads((a.pack / "recipe.toml").read_text())["arms"][a.arm]
    if not spec.get("reference"):
        raise SystemExit(f"ARM '{a.arm}' of {a.pack} is not trained relative to its init (reference = true)")
    record_path = a.pack / spec["adapter"] / "training.json"
    record = json.loads(record_path.read_text())
    base, tok = load_source(smollm2_gguf())
    model = PeftModel.from_pretrained(base, a.pack / spec["adapter"]).eval()
    enc = encode_pairs(tok, load_pairs(a.pack / spec["data"]), spec.get("max_len", 512), "truncate", {})
    held = [enc[i] for i in split(len(enc), spec.get("eval_frac", 0.1), spec.get("seed", 0))[1]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    micro = spec.get("micro_batch", 4)
    rel = with_reference(model, held, pad, "cpu", micro)  # the adapters off: the init's margins
    margin = arm_objective(model, pad, "cpu", beta_r=1.0).margin  # beta_r scales the loss, not the margin
    acc = evaluate(model, rel, margin, micro)["accuracy"]  # beyond them, as train-arm measured it
    print(f"{len(rel)} held-out pairs; accuracy beyond the init {acc:.3f} (recorded {record['heldout_accuracy']:.3f})")
    if len(rel) != record["n_heldout"] or abs(acc - record["heldout_accuracy"]) > 1e-9:
        raise SystemExit("the recomputation does not match the record: not written")
    record["heldout_reference_margins"] = [e[3] for e in rel]
    atomic_write_json(record_path, record)
    print(f"wrote {record_path}")


if __name__ == "__main__":
    main()
