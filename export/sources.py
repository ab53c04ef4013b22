"""Where models come from: a Hugging Face folder or a GGUF file (dequantized).

Checks a source before any slow work starts, with errors that name the folder
and the fix: no weights, no tokenizer, an architecture the exporters lack.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_genarm.errors import EdgeGenarmError

# model_type values that both llama.cpp's converter and optimum's ONNX exporter handle
SUPPORTED = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "granite",
    "olmo",
    "stablelm",
    "smollm3",
}


# A GGUF without a chat template is prompted raw at runtime (Engine.format_prompt): a string as
# is, messages as a "Role: content" transcript ending in "Assistant:". Training renders the same.
RAW_TEMPLATE = (
    "{%- if messages|length == 1 and messages[0].role == 'user' -%}{{ messages[0].content }}"
    "{%- else -%}{%- for m in messages -%}{{ m.role|capitalize }}: {{ m.content }}\n{% endfor -%}"
    "Assistant:{%- endif -%}"
)


class SourceError(EdgeGenarmError):
    """A source model folder or file that cannot be exported."""


def check_hf_dir(path: str | Path) -> dict:
    """Return config.json of a Hugging Face causal-LM folder, or say what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise SourceError(f"'{p}' is not a folder: pass a Hugging Face model folder or a .gguf file")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"'{p}' has no config.json: it is not a Hugging Face model folder")
    cfg = json.loads(cfg_path.read_text())
    weights = list(p.glob("*.safetensors")) + list(p.glob("pytorch_model*.bin"))
    if not weights:
        raise SourceError(
            f"'{p}' has no weights (*.safetensors or pytorch_model*.bin): "
            "download the full checkpoint, not only its config"
        )
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise SourceError(
            f"'{p}' has no tokenizer (tokenizer.json, tokenizer.model or vocab.json): "
            "save the tokenizer beside the model (tokenizer.save_pretrained)"
        )
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise SourceError(
            f"'{p}' is a '{mt}' model, which edge-genarm cannot export: supported "
            f"architectures are {', '.join(sorted(SUPPORTED))}"
        )
    return cfg


def is_gguf(path: str | Path) -> bool:
    """A .gguf file, or any file that starts with the GGUF magic (an Ollama blob has no suffix)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix == ".gguf":
        return True
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def load_source(source: str | Path, layers: int | None = None):
    """(model, tokenizer) in float32 from a HF folder or a GGUF file; optionally cut to `layers`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(source)
    if is_gguf(src):
        from edge_genarm.export.gguf_tokenizer import build_tokenizer

        tok = build_tokenizer(src)  # transformers' own GGUF tokenizer gets EOS/add_bos wrong
        if not tok.chat_template:
            tok.chat_template = RAW_TEMPLATE  # train on the text the runtime sends this model
        extra = gguf_config_overrides(src)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32", **extra)
    else:
        check_hf_dir(src)
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype="float32")
    if layers is not None:
        truncate_layers(model, layers)
    return model.eval(), tok


def gguf_config_overrides(path: str | Path) -> dict:
    """Config values transformers 4.57's GGUF loader leaves at their defaults but llama.cpp reads.

    Gemma 3: the attention scale is 1/sqrt(head_dim) in llama.cpp (1/sqrt(hidden/heads) for the
    62-layer 27B), while transformers' query_pre_attn_scalar defaults to 256 (right for 270M and
    1B only); linear RoPE scaling (4B and larger) is in the GGUF but not mapped."""
    from edge_genarm.gguf import read_gguf

    info = read_gguf(path)
    if info.architecture != "gemma3":
        return {}
    heads, hidden = info.arch_get("attention.head_count"), info.arch_get("embedding_length")
    head_dim = info.arch_get("attention.key_length") or hidden // heads
    out = {"query_pre_attn_scalar": hidden // heads if info.arch_get("block_count") == 62 else head_dim}
    factor = info.arch_get("rope.scaling.factor")
    if info.arch_get("rope.scaling.type") == "linear" and factor:
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return out


def truncate_layers(model, n: int) -> None:
    """Keep the first n decoder layers; the final norm and LM head stay."""
    total = model.config.num_hidden_layers
    if not 1 <= n <= total:
        raise SourceError(f"--layers must be between 1 and {total} for this model, got {n}")
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


def save_hf(model, tok, out: str | Path) -> Path:
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
