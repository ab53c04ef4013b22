"""Gemma 3 GGUFs as ARM sources (export/sources.py): the dequantized weights load into
Gemma3ForCausalLM with the right norms (llama.cpp's converter stores Gemma's RMSNorm weight as
1 + w), checked exactly on a tiny random f32 model and against llama.cpp on Gemma 3 270M."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def tiny_gemma3(out, tokenizer_gguf):
    """A random Gemma3ForCausalLM (7 layers: sliding and global, window 8) with random norm
    weights, saved with SmolLM2's tokenizer (the converter writes a BPE vocabulary for it)."""
    from edge_genarm.export.gguf_tokenizer import build_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = build_tokenizer(tokenizer_gguf)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, max_position_embeddings=2048, rope_theta=1e6, rope_local_base_freq=1e4,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's init is 0 (scale 1 + 0): make the shift visible
                p.copy_(torch.randn_like(p) * 0.3)
        model.model.embed_tokens.weight.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return model


def test_tiny_gemma3_gguf_loads_back_exactly(tmp_path, smollm2_gguf):
    from edge_genarm.export.converter import convert_hf_to_gguf
    from edge_genarm.export.sources import load_source

    from edge_genarm.gguf import read_gguf

    ref = tiny_gemma3(tmp_path / "hf", smollm2_gguf)
    gguf = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "tiny-gemma3.gguf", "f32")
    info = read_gguf(gguf)
    assert info.architecture == "gemma3" and info.arch_get("block_count") == 7
    import gguf as gguf_py

    stored = next(t for t in gguf_py.GGUFReader(gguf).tensors if t.name == "blk.0.attn_norm.weight")
    w0 = ref.model.layers[0].input_layernorm.weight.detach().numpy()
    assert np.allclose(np.asarray(stored.data), w0 + 1.0, atol=1e-6)  # llama.cpp's converter stores 1 + w
    model, tok = load_source(gguf)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.query_pre_attn_scalar == 16  # llama.cpp's scale 1/sqrt(head_dim), not the default 256
    with torch.no_grad():
        w_ref = ref.model.layers[0].input_layernorm.weight  # the GGUF holds 1 + w (llama.cpp's converter)
        assert torch.allclose(model.model.layers[0].input_layernorm.weight, w_ref, atol=1e-6)
        ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog, twice and again.").input_ids])
        assert ids.shape[1] > 8  # longer than the sliding window
        a = ref(ids).logits[0].numpy()
        b = model(ids).logits[0].numpy()
    err = np.abs(a - b).max() / np.abs(a).max()
    print(f"tiny gemma3 f32 GGUF -> transformers: max relative logit error {err:.2e}")
    assert err < 1e-4


@pytest.mark.slow
def test_gemma3_270m_logits_match_llama_cpp():
    """The dequantized Q4_K_M weights in PyTorch against llama.cpp on the same file: the quantized
    arithmetic differs, the model must not (correlation and top-1 agreement per position)."""
    import llama_cpp
    from edge_genarm.export.sources import load_source

    from edge_genarm.backends.llama_log import route_llama_log
    from tests.test_gguf_tokenizer import gemma_gguf

    path = gemma_gguf()
    model, tok = load_source(path)
    route_llama_log()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    texts = [
        "The capital of France is Paris, and the capital of Germany is",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    ]
    cors, agree = [], []
    for text in texts:
        ids = tok(text).input_ids
        assert ids == llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            out = model(torch.tensor([ids])).logits[0].numpy()
        cors += [np.corrcoef(out[i], ref[i])[0, 1] for i in range(len(ids))]
        agree += [out[i].argmax() == ref[i].argmax() for i in range(len(ids))]
    print(f"gemma3 270M: {len(cors)} positions, corr mean {np.mean(cors):.4f} min {np.min(cors):.4f}, "
          f"top-1 agreement {np.mean(agree):.3f}")  # fmt: skip
    assert np.mean(cors) > 0.995 and np.min(cors) > 0.98 and np.mean(agree) > 0.9
