"""A tiny pack recipe for build tests: the tiny fixture's base GGUF (a local file: a recipe's
`[base] path`, sha256-checked like the PyPI download) and two ARMs, each the base plus a
committed LoRA adapter on its last layer (random, seeded), shared on one trunk in int8 like
the default pack. It exercises every stage of the real build in seconds.
"""

from __future__ import annotations

from pathlib import Path

from edge_genarm.bundle import sha256_file

from .test_train import write_pairs

ARMS = {"yes": 1, "no": 2}  # name -> adapter seed


def make_adapter(base_hf: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter (rank 4, q/v projections of the last layer) with seeded random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_hf)
    layers = model.config.num_hidden_layers
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[layers - 1])
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(out)
    return out


def make_recipe(recipes: Path, tiny_root: Path, name: str = "tiny", share: bool = True) -> Path:
    """recipes/NAME-pack/recipe.toml (+ pairs, adapters); point EDGE_GENARM_RECIPES at `recipes`."""
    d = recipes / f"{name}-pack"
    d.mkdir(parents=True, exist_ok=True)
    write_pairs(d / "pairs.jsonl", n=16)
    base = tiny_root / "bundle" / "base.gguf"
    text = f'[base]\npath = "{base}"\nsha256 = "{sha256_file(base)}"\n'
    for arm, seed in ARMS.items():
        if not (d / "adapters" / arm / "adapter_config.json").is_file():
            make_adapter(tiny_root / "hf" / "base", d / "adapters" / arm, seed)
        text += (
            f'[arms.{arm}]\ndata = "pairs.jsonl"\nadapter = "adapters/{arm}"\nbeta_r = 0.5\n'
            f"max_len = 64\neval_frac = 0.5\nseed = {seed}\nweight = 0.5\n"
        )
    if share:
        text += '[share]\nquantize = ["int8"]\n'
    (d / "recipe.toml").write_text(text)
    return d
