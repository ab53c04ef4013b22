"""Rebuild a Hugging Face tokenizer from a GGUF file's own vocabulary.

transformers 4.57 reads GGUF tokenizers with the wrong EOS and add_bos for
SmolLM2, and a GGUF converted back from that gets an SPM vocab that makes
llama.cpp abort (FACTS.md). So the tokenizer is rebuilt here from the GGUF
metadata: tokens, merges, token types, BOS/EOS/PAD and the pre-tokenizer name.
"""

from __future__ import annotations

from pathlib import Path

from edge_genarm.errors import ModelFileError
from edge_genarm.gguf import GGUFInfo, read_gguf

# llama.cpp pre-tokenizer name -> tokenizers pre-tokenizer recipe
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default", "gpt-2"):
        return byte_level
    raise ModelFileError(
        f"GGUF pre-tokenizer '{pre}' is not supported by the GGUF -> Hugging Face tokenizer "
        "rebuild (supported: smollm, gpt2): start from the Hugging Face checkpoint instead"
    )


def build_tokenizer(gguf: GGUFInfo | str | Path):
    """A transformers PreTrainedTokenizerFast with the GGUF's exact token ids (SentencePiece
    vocabularies: checked token for token against llama.cpp, refused where they differ)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    info = gguf if isinstance(gguf, GGUFInfo) else read_gguf(gguf)
    kind = info.get("tokenizer.ggml.model")
    if kind == "llama":  # SentencePiece: rebuilt and checked against llama.cpp (gguf_spm.py)
        from edge_genarm.export.gguf_spm import build_spm_fast

        return build_spm_fast(info)
    if kind != "gpt2":
        raise ModelFileError(
            f"'{info.path}' has a '{kind}' tokenizer; only byte-level BPE ('gpt2') and SentencePiece "
            "('llama') GGUF vocabularies can be rebuilt: start from the Hugging Face checkpoint instead"
        )
    tokens = info.tokens
    types = info.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in info.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(info.get("tokenizer.ggml.pre", "gpt2"))
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)

    def name(key):
        i = info.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("bos"),
        eos_token=name("eos"),
        unk_token=name("unknown"),
        pad_token=name("padding"),
        add_bos_token=bool(info.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    template = info.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast
