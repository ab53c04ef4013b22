"""Compact Llama graphs: the same weights and math as optimum's export, in onnxruntime's fused ops.

optimum's `text-generation-with-past` graph spends about a hundred nodes per decoder layer
on shape arithmetic, mask building and rotary bookkeeping; on a 135M-parameter ARM at one
token per step, onnxruntime's per-node cost outweighs the matmuls. This rebuilds the graph
from the exported weights (read from optimum's own graph, by node name) with
onnxruntime's contrib ops, about 14 nodes per layer:

    x -> SimplifiedLayerNormalization -> q/k/v MatMul -> GroupQueryAttention (rotary inside,
         KV cache in optimum's layout) -> o MatMul -> Add -> SimplifiedLayerNormalization ->
         gate/up MatMul -> SiLU * up -> down MatMul -> Add

Inputs and outputs keep optimum's names and layouts (input_ids, attention_mask,
position_ids, past_key_values.N.key/value -> present.N.key/value, BNSH), so the runtime's
KV handling does not change. Pieces for a shared trunk (export/split.py) come out directly:
a layer range, with or without the embedding, ending in the residual stream or the final norm.
Exactness against the optimum graph is checked by the export gate, and in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_genarm.errors import BundleError

COMPACT = "edge-genarm-compact-llama"  # graph name of what build() writes
MAX_POSITIONS = 32768  # rotary cos/sin cache rows: the longest context an ARM can follow


@dataclass
class LlamaWeights:
    embed: np.ndarray  # (vocab, hidden)
    layers: list[dict[str, np.ndarray]]  # q k v o gate up down (in, out); ln1 ln2 (hidden,)
    norm: np.ndarray
    lm_head: np.ndarray  # (hidden, vocab)
    inv_freq: np.ndarray  # (head_dim / 2,)
    eps: float
    n_heads: int
    n_kv: int

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.size


def read_llama(model) -> LlamaWeights:
    """The weights of an optimum Llama export, found through its node names; BundleError when the
    graph is not that shape (the caller then keeps the generic cut)."""
    from onnx import numpy_helper

    g = model.graph
    if g.name == COMPACT:
        return _read_compact(model)
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    nodes = {n.name: n for n in g.node}

    def const(name):
        while name not in inits:  # through Identity aliases and Constant nodes
            n = producer.get(name)
            if n is None:
                raise BundleError(f"'{name}' is not a constant: not a plain Llama export")
            if n.op_type == "Constant":
                return numpy_helper.to_array(n.attribute[0].t)
            if n.op_type == "Transpose" and n.input[0] in inits:
                return numpy_helper.to_array(inits[n.input[0]]).T
            if n.op_type != "Identity":
                raise BundleError(f"'{name}' comes from {n.op_type}: not a plain Llama export")
            name = n.input[0]
        return numpy_helper.to_array(inits[name])

    def node(name):
        if name not in nodes:
            raise BundleError(f"node '{name}' is missing: not an optimum Llama export")
        return nodes[name]

    layers, i = [], 0
    while f"/model/layers.{i}/self_attn/q_proj/MatMul" in nodes:
        p = f"/model/layers.{i}"
        w = {k: const(node(f"{p}/self_attn/{k}_proj/MatMul").input[1]) for k in "qkvo"}
        w.update({k: const(node(f"{p}/mlp/{k}_proj/MatMul").input[1]) for k in ("gate", "up", "down")})
        w["ln1"] = const(node(f"{p}/input_layernorm/Mul_1").input[0])
        w["ln2"] = const(node(f"{p}/post_attention_layernorm/Mul_1").input[0])
        layers.append(w)
        i += 1
    if not layers:
        raise BundleError("no /model/layers.N/ nodes: not an optimum Llama export")
    emb = next(n for n in g.node if n.op_type == "Gather" and "input_ids" in n.input)
    inv = const(node("/model/rotary_emb/Expand").input[0]).reshape(-1)
    for k in ("Mul_1", "Mul_2"):  # rotary attention scaling: 1 for plain rope
        s = const(node(f"/model/rotary_emb/{k}").input[1])
        if not np.allclose(s, 1.0):
            raise BundleError("scaled rotary embeddings are not supported by the compact graph")
    eps = float(const(node("/model/layers.0/input_layernorm/Add").input[1]))
    lm = producer["logits"]
    head_dim = 2 * inv.size
    return LlamaWeights(
        embed=const(emb.input[0]),
        layers=layers,
        norm=const(node("/model/norm/Mul_1").input[0]),
        lm_head=const(lm.input[1]),
        inv_freq=inv.astype(np.float32),
        eps=eps,
        n_heads=layers[0]["q"].shape[1] // head_dim,
        n_kv=layers[0]["k"].shape[1] // head_dim,
    )


def _read_compact(model) -> LlamaWeights:
    """The weights of a whole graph that build() wrote (so a compact ARM can be re-cut)."""
    from onnx import helper, numpy_helper

    a = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if "embed_tokens" not in a or "lm_head" not in a:
        raise BundleError("a compact graph without its embedding and LM head cannot be rebuilt")
    keys = ("q", "k", "v", "o", "gate", "up", "down", "ln1", "ln2")
    layers = []
    while f"l{len(layers)}.q" in a:
        layers.append({k: a[f"l{len(layers)}.{k}"] for k in keys})
    if not layers or "inv_freq" not in a:
        raise BundleError("this compact graph is quantized or cut: export the ARM again to rebuild it")
    attrs = {}
    for n in model.graph.node:
        if n.op_type in ("GroupQueryAttention", "SimplifiedLayerNormalization"):
            attrs.update({x.name: helper.get_attribute_value(x) for x in n.attribute})
    return LlamaWeights(a["embed_tokens"], layers, a["norm"], a["lm_head"], a["inv_freq"],
                        float(attrs["epsilon"]), int(attrs["num_heads"]), int(attrs["kv_num_heads"]))  # fmt: skip


@dataclass
class MixLoRA:
    """A gated LoRA per objective (export/train_mix.py): matrix W of layer i computes
    W x + scale * B ((A x) * repeat(alpha, rank)), alpha the graph's input (n objectives)."""

    n_obj: int
    rank: int
    scale: float
    weights: dict  # (layer, matrix) -> (A (n_obj * rank, in), B (out, n_obj * rank))


def build(w: LlamaWeights, first: int, last: int, embed: bool, final: str, meta: dict | None = None,
          mix: MixLoRA | None = None):  # fmt: skip
    """A graph of layers [first, last): from token ids (`embed`) or from `hidden`; ending in
    'hidden' (the residual stream), 'normed' (after the final norm) or 'logits'. `mix`: the
    matrices it names carry gated LoRAs, and the graph takes 'alpha' (n objectives) too; their
    nodes' names hold '/lora_' (quantization leaves them float: export/quantize.py)."""
    from onnx import TensorProto, helper

    nodes, inits = [], []
    d, hd = w.embed.shape[1], w.head_dim

    def init(name, arr):
        inits.append((name, arr))  # into the model at the end: make_graph/make_model copy each weight twice
        return name

    def rms(x, name, weight, out):  # RMSNorm
        return op("SimplifiedLayerNormalization", [x, init(name, weight)], [out], axis=-1, epsilon=w.eps)

    where = [""]  # node names carry optimum's "/model/layers.N/" so export/split.py can cut them too

    def op(kind, ins, outs, domain="", **attrs):
        nodes.append(helper.make_node(kind, ins, outs, name=f"{where[0]}/{outs[0]}", domain=domain, **attrs))
        return outs[0]

    # no position_ids: GroupQueryAttention places new tokens after the cached ones
    inputs = [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    if embed:
        inputs.insert(0, helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
        x = op("Gather", [init("embed_tokens", w.embed), "input_ids"], ["embedded"])
    else:
        inputs.insert(0, helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", d]))
        x = "hidden"
    # GroupQueryAttention's lengths: total length (scalar) and total - 1 per row, int32
    one = init("one_i64", np.array([1], dtype=np.int64))
    total = op("ReduceSum", ["attention_mask", one], ["total_len_2d"], keepdims=1)
    seqlens = op("Cast", [op("Sub", [op("ReduceSum", ["attention_mask", one], ["total_1d"], keepdims=0), one],
                            ["seqlens_i64"])], ["seqlens_k"], to=TensorProto.INT32)  # fmt: skip
    total_len = op("Cast", [op("Reshape", [total, init("scalar_shape", np.array([], dtype=np.int64))],
                               ["total_scalar"])], ["total_sequence_length"], to=TensorProto.INT32)  # fmt: skip
    gate = None
    if mix is not None:
        inputs.append(helper.make_tensor_value_info("alpha", TensorProto.FLOAT, [mix.n_obj]))
        spread = np.kron(np.eye(mix.n_obj, dtype=np.float32), np.ones((1, mix.rank), dtype=np.float32)) * np.float32(mix.scale)
        row = op("Reshape", ["alpha", init("alpha_shape", np.array([1, mix.n_obj], dtype=np.int64))], ["alpha_row"])
        gate = op("MatMul", [row, init("alpha_spread", spread)], ["lora_gate"])  # (1, n * rank)

    def matmul(h, i, key, out):
        y = op("MatMul", [h, init(f"l{i}.{key}", w.layers[i][key])], [out])
        if gate is None or (i, key) not in mix.weights:
            return y
        a, b = mix.weights[(i, key)]
        t = op("MatMul", [h, init(f"l{i}.{key}.lora_A", np.ascontiguousarray(a.T, dtype=np.float32))], [f"{out}/lora_a"])
        t = op("Mul", [t, gate], [f"{out}/lora_gated"])
        t = op("MatMul", [t, init(f"l{i}.{key}.lora_B", np.ascontiguousarray(b.T, dtype=np.float32))], [f"{out}/lora_b"])
        return op("Add", [y, t], [f"{out}/lora_sum"])

    pos = np.arange(MAX_POSITIONS, dtype=np.float32)[:, None] * w.inv_freq[None, :]
    cos, sin = init("cos_cache", np.cos(pos)), init("sin_cache", np.sin(pos))
    outputs = []
    init("inv_freq", w.inv_freq)  # unused by the nodes: lets read_llama rebuild the rotary tables
    for i in range(first, last):
        L, p = w.layers[i], f"l{i}"
        where[0] = f"/model/layers.{i}"
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch", w.n_kv, "past", hd]))  # fmt: skip
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch", w.n_kv, "total", hd]))  # fmt: skip
        h = rms(x, f"{p}.ln1", L["ln1"], f"{p}.h1")
        q, k, v = (matmul(h, i, n, f"{p}.{n}_out") for n in "qkv")
        attn = op(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total_len, cos, sin],
            [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"],
            domain="com.microsoft", num_heads=w.n_heads, kv_num_heads=w.n_kv, do_rotary=1,
            rotary_interleaved=0, scale=float(1 / np.sqrt(hd)),
        )  # fmt: skip
        x = op("Add", [x, matmul(attn, i, "o", f"{p}.o_out")], [f"{p}.res1"])
        h = rms(x, f"{p}.ln2", L["ln2"], f"{p}.h2")
        g = matmul(h, i, "gate", f"{p}.gate_out")
        act = op("Mul", [g, op("Sigmoid", [g], [f"{p}.sig"])], [f"{p}.silu"])
        up = matmul(h, i, "up", f"{p}.up_out")
        mlp = matmul(op("Mul", [act, up], [f"{p}.act"]), i, "down", f"{p}.mlp")
        x = op("Add", [x, mlp], [f"{p}.res2"])
    where[0] = "/model"
    if final in ("normed", "logits"):
        x = rms(x, "norm", w.norm, "normed")
    if final == "logits":
        x = op("MatMul", [x, init("lm_head", w.lm_head)], ["logits"])
    elif final == "hidden":
        x = op("Identity", [x], ["hidden"])
    head_shape = ["batch", "seq", w.lm_head.shape[1] if final == "logits" else d]
    outputs.insert(0, helper.make_tensor_value_info(final, TensorProto.FLOAT, head_shape))
    graph = helper.make_graph(nodes, COMPACT, inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=9,
    )
    add_initializers(model, inits)
    if meta:
        helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    return model


def add_initializers(model, arrays: list[tuple[str, np.ndarray]]) -> None:
    """Weights straight into `model`, in order, one at a time; `arrays` is emptied as they go in (peak
    memory: the model and one weight, when nothing else holds them)."""
    from onnx import numpy_helper

    arrays.reverse()
    while arrays:
        name, arr = arrays.pop()
        model.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=arr.dtype), name))
        del arr


def lm_head_graph(w: LlamaWeights, meta: dict | None = None):
    """normed (batch, seq, hidden) -> logits: the LM head alone (shared by sibling heads)."""
    return lm_head_model(w.lm_head, meta)


def lm_head_model(weight: np.ndarray, meta: dict | None = None):
    """The LM-head graph of a (hidden, vocab) float weight: one MatMul from 'normed' to 'logits'."""
    from onnx import TensorProto, helper

    d, v = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["normed", "lm_head"], ["logits"], name="/lm_head")],
        "edge-genarm-lm-head",
        [helper.make_tensor_value_info("normed", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", v])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    add_initializers(model, [("lm_head", weight)])
    if meta:
        helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    return model


def compact_file(path) -> str:
    """Rewrite an optimum Llama export at `path` as a compact graph; "compact", or "optimum" when
    the graph is not one this module reads (left as it is)."""
    import onnx
    from edge_genarm.export.onnx_io import save_model

    try:
        w = read_llama(onnx.load(str(path)))
    except BundleError:
        return "optimum"
    save_model(build(w, 0, len(w.layers), True, "logits"), path)
    return "compact"
