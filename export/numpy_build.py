"""An ARM's weights without torch: a llama GGUF dequantized in numpy, a LoRA adapter merged in.

    W_arm = W_base + (alpha / r) * B @ A        (per adapted projection; peft's merge_and_unload)

The base comes out of the GGUF as transformers would load it (`gguf.quants.dequantize`, the
same function transformers calls, then llama.cpp's Q/K row permutation undone), in the
layout export/compact.py builds graphs from: projections as (in, out). The merge is float32
in peft's order of operations, summed without BLAS: on the default pack's adapters every merged
weight equals the one the torch build exported, bit for bit, and no CPU's kernels change it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from edge_genarm.export.compact import LlamaWeights

from edge_genarm.errors import BundleError, ConfigError

# GGUF tensor of layer N -> the compact weight it becomes (all stored (out, in) in the GGUF)
_GGUF_LAYER = {
    "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
    "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
    "attn_norm": "ln1", "ffn_norm": "ln2",
}  # fmt: skip
# peft module name (self_attn.q_proj, mlp.down_proj, ...) -> the compact weight
_PEFT_MODULE = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
}  # fmt: skip


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders Q/K rows per head for its rotary layout
    (transformers' reverse_permute_weights)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def rope_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """1 / theta^(2i/d) in float32, as transformers computes it for plain rotary embeddings."""
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exps)).astype(np.float32)


class _Layer(Mapping):
    """One layer's weights, dequantized when read and not kept (a graph builder reads each once,
    and the whole model in float32 would be 540 MB resident for SmolLM2-135M)."""

    def __init__(self, get, i: int, n_heads: int, n_kv: int):
        self.get, self.i, self.heads = get, i, {"q": n_heads, "k": n_kv}

    def __getitem__(self, key: str) -> np.ndarray:
        g = next(g for g, k in _GGUF_LAYER.items() if k == key)
        w = self.get(f"blk.{self.i}.{g}.weight")
        if key in self.heads:
            w = _unpermute(w, self.heads[key])
        return np.ascontiguousarray(w.T) if key in _PEFT_MODULE.values() else w  # (out, in) -> (in, out)

    def __iter__(self):
        return iter(_GGUF_LAYER.values())

    def __len__(self) -> int:
        return len(_GGUF_LAYER)


_KV_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar value sizes


def tensor_table(path: str | Path) -> dict[str, tuple[int, tuple[int, ...], int, int]]:
    """{name: (ggml type, dims (ggml order), absolute offset, bytes)} of a GGUF, read by skipping its
    metadata (gguf.GGUFReader parses the 100k-string vocabulary into numpy fields: ~50 s on 2 busy
    cores, against ~0.2 s here). read_gguf has validated the file before this runs."""
    import mmap

    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 8

        def take(fmt: str):
            nonlocal pos
            v = struct.unpack_from("<" + fmt, mm, pos)
            pos += struct.calcsize("<" + fmt)
            return v[0]

        def skip(t: int) -> None:
            nonlocal pos
            if t == 8:  # string
                n = take("Q")  # (not `pos += take(...)`: that reads pos before take moves it)
                pos += n
            elif t == 9:  # array
                at, n = take("I"), take("Q")
                if at in _KV_SIZES:
                    pos += n * _KV_SIZES[at]
                else:
                    for _ in range(n):
                        skip(at)
            else:
                pos += _KV_SIZES[t]

        n_tensors, n_kv = take("Q"), take("Q")
        align = 32
        for _ in range(n_kv):
            n = take("Q")
            key = mm[pos : pos + n].decode()
            pos += n
            t = take("I")
            if key == "general.alignment" and t == 4:
                align = take("I")
            else:
                skip(t)
        rows = []
        for _ in range(n_tensors):
            n = take("Q")
            name = mm[pos : pos + n].decode()
            pos += n
            dims = tuple(take("Q") for _ in range(take("I")))
            rows.append((name, take("I"), dims, take("Q")))
        start = (pos + align - 1) // align * align
    out = {}
    for name, ttype, dims, offset in rows:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        count = 1
        for d in dims:
            count *= d
        out[name] = (ttype, dims, start + offset, count // block * size)
    return out


def _read_tensor(mm, entry) -> np.ndarray:
    """One tensor dequantized to float32, shaped (out, in) as transformers holds it."""
    import gguf

    ttype, dims, offset, nbytes = entry
    raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset)
    rows = nbytes // max(1, int(np.prod(dims[1:], dtype=np.int64)))
    arr = gguf.quants.dequantize(raw.reshape(-1, rows), gguf.GGMLQuantizationType(ttype))
    return np.asarray(arr, dtype=np.float32).reshape(tuple(reversed(dims)))


def gguf_weights(path: str | Path, layers: int | None = None, lazy: bool = False) -> LlamaWeights:
    """The weights of a llama-architecture GGUF (its first `layers` layers), dequantized to float32.
    `lazy`: each layer's arrays are dequantized when read (see _Layer); the embedding is read now."""
    from edge_genarm.gguf import read_gguf

    path = Path(path)
    info = read_gguf(path)
    if info.architecture != "llama":
        raise BundleError(
            f"'{path}' is a '{info.architecture}' model: the torch-free pack build reads llama GGUFs only; "
            "build this pack with the export extra (pip install 'edge-genarm[export]')"
        )
    n_heads = int(info.arch_get("attention.head_count"))
    n_kv = int(info.arch_get("attention.head_count_kv", n_heads))
    n_layers = int(info.arch_get("block_count"))
    if info.arch_get("rope.scaling.type") not in (None, "none"):
        raise BundleError(f"'{path}' uses scaled rotary embeddings: the compact graph does not support them")
    tensors = tensor_table(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise BundleError(f"'{path}' has no tensor '{name}': not a complete llama GGUF")
        return _read_tensor(mm, tensors[name])

    n = n_layers if layers is None else min(layers, n_layers)
    out_layers = [_Layer(get, i, n_heads, n_kv) for i in range(n)]
    if not lazy:
        out_layers = [dict(L) for L in out_layers]
    embed = get("token_embd.weight")
    lm = get("output.weight") if "output.weight" in tensors else embed  # tied: SmolLM2
    head_dim = int(info.arch_get("attention.key_length", embed.shape[1] // n_heads))
    return LlamaWeights(
        embed=embed,
        layers=out_layers,
        norm=get("output_norm.weight"),
        lm_head=lm.T,  # a view: a graph builder copies it when it writes it
        inv_freq=rope_inv_freq(float(info.arch_get("rope.freq_base", 10000.0)), head_dim),
        eps=float(np.float32(info.arch_get("attention.layer_norm_rms_epsilon", 1e-5))),
        n_heads=n_heads,
        n_kv=n_kv,
    )


def tensor_digest(path: str | Path, names) -> str:
    """sha256 of GGUF tensors' stored bytes (quantized as they are), in the order given."""
    tensors = tensor_table(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    h = hashlib.sha256()
    for name in names:
        if name in tensors:
            _, _, offset, nbytes = tensors[name]
            h.update(name.encode() + mm[offset : offset + nbytes].tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# LoRA adapters (peft's adapter_config.json + adapter_model.safetensors)
# ---------------------------------------------------------------------------

_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file (8-byte header length, JSON header, raw data)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        if rec["dtype"] not in _DTYPES:
            raise ConfigError(f"'{path}': tensor '{name}' is {rec['dtype']}; the merge reads F16/F32/F64")
        a, b = rec["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=_DTYPES[rec["dtype"]]).reshape(rec["shape"])
    return out


def read_adapter(adapter: str | Path) -> tuple[dict, dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]]:
    """(adapter_config, {(layer, compact weight): (A (r, in), B (out, r))}) of a peft LoRA folder;
    a ConfigError for what the merge does not implement (DoRA, biases, saved modules)."""
    adapter = Path(adapter)
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"'{adapter}' is not a LoRA adapter folder (no adapter_config.json): retrain it")
    cfg = json.loads(cfg_path.read_text())
    unsupported = {
        "peft_type": cfg.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(cfg.get("use_dora")),
        "bias": cfg.get("bias", "none") != "none" or bool(cfg.get("lora_bias")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "rank_pattern": bool(cfg.get("rank_pattern")) or bool(cfg.get("alpha_pattern")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(
            f"adapter '{adapter}' uses {', '.join(bad)}: the torch-free merge handles plain LoRA only; "
            "build with --retrain (train extra) or save a plain LoRA adapter"
        )
    tensors = read_safetensors(adapter / "adapter_model.safetensors")
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        parts = name.split(".")
        try:
            layer = int(parts[parts.index("layers") + 1])
            module, which = parts[-3], parts[-2]
        except (ValueError, IndexError):
            raise ConfigError(f"adapter '{adapter}': tensor '{name}' is not a layer's LoRA weight") from None
        if module not in _PEFT_MODULE or which not in ("lora_A", "lora_B"):
            raise ConfigError(f"adapter '{adapter}': tensor '{name}' adapts '{module}', which the merge does not know")
        pairs.setdefault((layer, _PEFT_MODULE[module]), {})[which] = arr
    out = {}
    for key, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ConfigError(f"adapter '{adapter}': layer {key[0]} {key[1]} has only {', '.join(ab)}")
        out[key] = (ab["lora_A"], ab["lora_B"])
    return cfg, out


def lora_scale(cfg: dict) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    return alpha / (r**0.5 if cfg.get("use_rslora") else r)


def lora_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """B @ A (out, in) in float32, summed over the rank in order, one rounding per term: what
    torch's matmul gives for these ranks (products of float16 weights are exact in float32), so
    the merged weights equal peft's bit for bit, on any CPU (no BLAS kernel is involved)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    delta = np.zeros((b.shape[0], a.shape[1]), dtype=np.float32)
    for j in range(a.shape[0]):
        delta += np.outer(b32[:, j], a32[j])
    return delta


def merge_adapter(base: LlamaWeights, adapter: str | Path, base_name: str = "the base") -> LlamaWeights:
    """A new LlamaWeights: `base` with the adapter merged in (only the adapted arrays are new)."""
    cfg, lora = read_adapter(adapter)
    scale = lora_scale(cfg)
    layers = list(base.layers)
    for i in {i for i, _ in lora if i < len(layers)}:  # only the adapted layers are read (and copied)
        layers[i] = dict(layers[i])
    for (i, key), (a, b) in sorted(lora.items()):
        if i >= len(layers):
            raise BundleError(
                f"adapter '{adapter}' adapts layer {i}, {base_name} has {len(layers)} layers: it was "
                "trained on another base; retrain it (pack build --retrain)"
            )
        w = layers[i][key]  # (in, out)
        if a.shape[1] != w.shape[0] or b.shape[0] != w.shape[1] or a.shape[0] != b.shape[1]:
            raise BundleError(
                f"adapter '{adapter}': layer {i} {key} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, {base_name}'s weight is {w.shape[1]} x {w.shape[0]} (out x in): "
                "the adapter was trained on another base; retrain it (pack build --retrain)"
            )
        layers[i][key] = np.ascontiguousarray((w.T + lora_delta(a, b) * np.float32(scale)).T)
    return LlamaWeights(base.embed, layers, base.norm, base.lm_head, base.inv_freq, base.eps, base.n_heads, base.n_kv)


def adapted_layers(adapter: str | Path) -> list[int]:
    """The layers an adapter changes (from its weights, not its config)."""
    return sorted({i for i, _ in read_adapter(adapter)[1]})


# ---------------------------------------------------------------------------
# a reference forward pass (float64), to check the graphs built from these weights
# ---------------------------------------------------------------------------


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding on (seq, heads, head_dim), halves rotated (transformers' rotate_half)."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def numpy_forward(w: LlamaWeights, ids: list[int], upto: int | None = None, hidden=None) -> np.ndarray:
    """Logits (seq, vocab) of a llama model with weights `w` on token ids `ids` (causal, no cache).
    `upto` k: the residual stream entering layer k instead (seq, hidden); `hidden`: start from
    that residual stream at the first layer of `w.layers` (a head's layers) instead of the ids."""
    n, hd = len(ids), w.head_dim
    x = w.embed[np.asarray(ids)].astype(np.float64) if hidden is None else np.asarray(hidden, dtype=np.float64)
    ang = np.arange(n, dtype=np.float64)[:, None] * w.inv_freq[None, :].astype(np.float64)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for L in w.layers[:upto]:
        h = _rms(x, L["ln1"], w.eps)
        q = _rope((h @ L["q"]).reshape(n, w.n_heads, hd), cos, sin)
        k = _rope((h @ L["k"]).reshape(n, w.n_kv, hd), cos, sin).repeat(w.n_heads // w.n_kv, axis=1)
        v = (h @ L["v"]).reshape(n, w.n_kv, hd).repeat(w.n_heads // w.n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        att = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, -1)
        x = x + att @ L["o"]
        h = _rms(x, L["ln2"], w.eps)
        g = h @ L["gate"]
        x = x + (g / (1 + np.exp(-g)) * (h @ L["up"])) @ L["down"]
    if upto is not None:
        return x
    return _rms(x, w.norm, w.eps) @ w.lm_head
