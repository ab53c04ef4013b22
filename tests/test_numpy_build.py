"""The torch-free ARM weights (export/numpy_build.py) against transformers, peft and optimum.

The tiny fixture's base is a random LlamaForCausalLM converted to an f32 GGUF by llama.cpp's
converter (which permutes Q/K rows): read back in numpy it must be the HF model's weights
exactly, a LoRA adapter merged in numpy must equal peft's merge, and the compact graph built
from them must give the HF model's logits.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from edge_genarm.export.numpy_build import gguf_weights, merge_adapter, numpy_forward, read_safetensors

from edge_genarm.errors import BundleError, ConfigError

IDS = [1, 504, 2387, 314, 253, 1345, 28, 1116, 17, 2]


@pytest.fixture(scope="module")
def hf_base(tiny_root):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(tiny_root / "hf" / "base").eval()


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def test_gguf_weights_are_the_hf_models(tiny_bundle, hf_base):
    w = gguf_weights(tiny_bundle / "base.gguf")
    sd = {k: v.numpy() for k, v in hf_base.state_dict().items()}
    assert len(w.layers) == hf_base.config.num_hidden_layers
    np.testing.assert_array_equal(w.embed, sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(w.lm_head, sd["lm_head.weight"].T)
    for i, L in enumerate(w.layers):
        p = f"model.layers.{i}."
        for key, name in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("down", "mlp.down_proj")):
            np.testing.assert_array_equal(L[key], sd[p + name + ".weight"].T)  # Q/K: permutation undone
        np.testing.assert_array_equal(L["ln1"], sd[p + "input_layernorm.weight"])
    hf_inv = hf_base.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(w.inv_freq, hf_inv, rtol=1e-6)
    assert w.n_heads == 4 and w.n_kv == 2


def test_compact_graph_from_numpy_weights_gives_the_hf_logits(tiny_bundle, hf_base, tmp_path):
    import onnxruntime as ort
    from edge_genarm.export.compact import build
    from edge_genarm.export.onnx_io import save_model

    w = gguf_weights(tiny_bundle / "base.gguf")
    ref = _torch_logits(hf_base, IDS)
    assert np.abs(numpy_forward(w, IDS) - ref).max() < 1e-4
    save_model(build(w, 0, len(w.layers), True, "logits"), tmp_path / "m.onnx")
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([IDS]), "attention_mask": np.ones((1, len(IDS)), dtype=np.int64)}
    for inp in s.get_inputs():
        if inp.name.startswith("past_key_values."):
            feed[inp.name] = np.zeros((1, w.n_kv, 0, w.head_dim), dtype=np.float32)
    got = s.run(["logits"], feed)[0][0]
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


@pytest.fixture(scope="module")
def adapter(tiny_root, tmp_path_factory):
    pytest.importorskip("peft")
    from .tiny_pack import make_adapter

    out = make_adapter(tiny_root / "hf" / "base", tmp_path_factory.mktemp("lora") / "yes", seed=1)
    t = read_safetensors(out / "adapter_model.safetensors")  # float16, as train-arm saves adapters
    _write_safetensors(out / "adapter_model.safetensors", {k: v.astype(np.float16) for k, v in t.items()})
    return out


def test_lora_merge_equals_peft(tiny_bundle, tiny_root, adapter, tmp_path):
    from edge_genarm.export.train_arm import apply_adapter
    from transformers import LlamaForCausalLM

    merged = merge_adapter(gguf_weights(tiny_bundle / "base.gguf"), adapter)
    hf = LlamaForCausalLM.from_pretrained(apply_adapter(tiny_bundle / "base.gguf", adapter, tmp_path / "m"))
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    last = len(merged.layers) - 1
    for key, name in (("q", "q_proj"), ("v", "v_proj"), ("k", "k_proj")):
        want = sd[f"model.layers.{last}.self_attn.{name}.weight"].T
        np.testing.assert_array_equal(merged.layers[last][key], want)  # bit for bit
    base = gguf_weights(tiny_bundle / "base.gguf")
    assert not np.array_equal(merged.layers[last]["q"], base.layers[last]["q"])  # the adapter did something
    np.testing.assert_array_equal(merged.layers[last]["k"], base.layers[last]["k"])  # not adapted
    np.testing.assert_array_equal(merged.layers[0]["q"], base.layers[0]["q"])
    assert np.abs(numpy_forward(merged, IDS) - _torch_logits(hf.eval(), IDS)).max() < 1e-4


def _write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": {"float16": "F16", "float32": "F32"}[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}  # fmt: skip
        offset += len(b)
        blobs.append(b)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_adapter_of_another_base_is_refused_naming_both(tiny_bundle, adapter, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    t = read_safetensors(bad / "adapter_model.safetensors")
    name = next(k for k in t if "q_proj.lora_A" in k)
    t[name] = np.zeros((t[name].shape[0], 48), dtype=t[name].dtype)  # 48 inputs, the base has 64
    _write_safetensors(bad / "adapter_model.safetensors", t)
    base = gguf_weights(tiny_bundle / "base.gguf")
    with pytest.raises(BundleError, match=r"adapter '.*bad'.*lora_A \(4, 48\).*the base 'base.gguf'.*64.*retrain"):
        merge_adapter(base, bad, "the base 'base.gguf'")
    t[name] = np.zeros((4, 64), dtype=t[name].dtype)
    deep = {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}  # a layer the base lacks
    _write_safetensors(bad / "adapter_model.safetensors", deep)
    with pytest.raises(BundleError, match=r"adapts layer 7, the base 'base.gguf' has 2 layers"):
        merge_adapter(base, bad, "the base 'base.gguf'")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ConfigError, match="uses use_dora.*plain LoRA only"):
        merge_adapter(base, bad)
