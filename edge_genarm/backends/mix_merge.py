"""The mix head with its LoRAs merged into its weights at one alpha (issue 21: the fast mode).

A mix head as the pack ships it (export/lean_mix.py) keeps, beside each int4 projection of its
layers, the gated LoRA of every objective as float nodes: `x @ A`, `* gate(alpha)`, `@ B`, `+`.
They make the head hold 5.3 MB of float LoRA weights beside its 8.8 MB of int4 ones and run 4
nodes more per projection; at one position per step, with the base's weights having pushed the
head's out of the cache between two steps, the head reads all of those bytes from memory
(measured: scripts/bench_mixmerge.py, docs/speed.md "The mix head, merged").

A request's alpha does not change while it decodes, so the fast mode merges the LoRAs at that
alpha into the base's own float weights (read from the base GGUF the head was cut from), and
quantizes the sums as the pack quantized the head (MatMulNBits, the same bits, block size and
accuracy level, symmetric): one int4 matrix per projection, no LoRA node. The merged head is the
float head at that alpha quantized once, as the shipped one is the float base quantized once (KL
to the float head measured on the pack's probe: the same, 0.07-0.10 nats against 0.08-0.09;
tests/test_mix.py). Merging costs ~0.3 s per new alpha; the last few merged heads are kept.
Anything it cannot merge (a head whose projections carry zero points or another layout, a base
GGUF it cannot read) runs the shipped graph, with the reason logged.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import EdgeGenarmError


class MergeError(EdgeGenarmError):
    """Why a mix head cannot be merged (it then runs as shipped)."""


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def projections(graph) -> list[dict]:
    """Each projection (a MatMulNBits, or a MatMul on a float initializer) with its gated LoRA, in
    graph order: {node, x, A, gate, B, nodes, out}: `nodes` the projection, x @ A, * gate, @ B
    and + nodes; `out` the sum."""
    produced = {o: n for n in graph.node for o in n.output}
    adds = defaultdict(list)
    for n in graph.node:
        if n.op_type == "Add":
            for i in n.input:
                adds[i].append(n)
    inits = {i.name for i in graph.initializer}
    found = []
    for n in graph.node:
        if not (n.op_type == "MatMulNBits" and n.domain == "com.microsoft" or n.op_type == "MatMul" and n.input[1] in inits):
            continue
        x, y = n.input[0], n.output[0]
        for add in adds.get(y, []):
            other = add.input[1] if add.input[0] == y else add.input[0]
            mb = produced.get(other)
            if mb is None or mb.op_type != "MatMul" or mb.input[1] not in inits:
                continue
            mul = produced.get(mb.input[0])
            if mul is None or mul.op_type != "Mul":
                continue
            ma = produced.get(mul.input[0])
            if ma is None or ma.op_type != "MatMul" or ma.input[0] != x or ma.input[1] not in inits:
                continue
            found.append({"node": n, "x": x, "A": ma.input[1], "gate": mul.input[1], "B": mb.input[1],
                          "nodes": [n, ma, mul, mb, add], "out": add.output[0]})  # fmt: skip
            break
    return found


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """`w` (N, K) float -> MatMulNBits' symmetric form: (packed (N, blocks, block * bits / 8)
    uint8, scales (N, blocks) float32); per block, scale = the value of largest magnitude over
    -2^(bits-1) (so it maps to the lowest code), zero point 2^(bits-1), as onnxruntime's quantizer."""
    n, k = w.shape
    nb = -(-k // block)
    x = np.zeros((n, nb * block), dtype=np.float32)
    x[:, :k] = w
    x = x.reshape(n, nb, block)
    half = 1 << (bits - 1)
    peak = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    scale = (peak / -half).astype(np.float32)
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(x / scale[..., None]), -half, half - 1) + half).astype(np.uint8)
    if bits == 4:
        q = q.reshape(n, nb, block // 2, 2)
        q = q[..., 0] | (q[..., 1] << 4)
    return np.ascontiguousarray(q, dtype=np.uint8), scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, bits: int, k: int) -> np.ndarray:
    """`quantize_blocks`' output back to (N, K) float32."""
    n, nb = scale.shape
    if bits == 4:
        q = np.stack([q & 15, q >> 4], -1).reshape(n, nb, -1)
    x = (q.astype(np.float32) - (1 << (bits - 1))) * scale[..., None]
    return x.reshape(n, -1)[:, :k]


def _layer_weights(gguf: Path, wanted: set[tuple[int, str]]) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, key): float32 (in, out)} for the base GGUF's projections `wanted`, dequantized."""
    try:
        from edge_genarm.export.numpy_build import _Layer, _read_tensor, tensor_table
        from edge_genarm.gguf import read_gguf
    except ImportError as e:  # the pack extra (gguf, onnx) is not installed
        raise MergeError(f"cannot read the base's weights ({e}): pip install 'edge-genarm[pack]'") from None
    info = read_gguf(gguf)
    heads = int(info.arch_get("attention.head_count"))
    n_kv = int(info.arch_get("attention.head_count_kv", heads))
    tensors = tensor_table(gguf)
    mm = np.memmap(gguf, dtype=np.uint8, mode="r")

    def get(name):
        if name not in tensors:
            raise MergeError(f"'{gguf}' has no tensor '{name}'")
        return _read_tensor(mm, tensors[name])

    return {(i, key): _Layer(get, i, heads, n_kv)[key] for i, key in sorted(wanted)}


def _key(lora_a: str) -> tuple[int, str] | None:
    hit = re.fullmatch(r"l(\d+)\.(\w+)\.lora_A", lora_a)
    return (int(hit.group(1)), hit.group(2)) if hit else None


def merged_model(path: Path, gguf: Path, alpha: np.ndarray, block_size: int | None = None,
                 bits: dict | None = None, keep=(), x_mean: dict | None = None):  # fmt: skip
    """The mix head at `path` (an onnx ModelProto) with every gated LoRA merged at `alpha` into the
    base GGUF's float weights and quantized as its projection was (`block_size`: in blocks of
    that size instead; `bits`: {(layer, matrix): bits} in those bits instead; `keep`: the
    (layer, matrix) projections left as shipped, their LoRAs beside them); raises MergeError."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    if "alpha_spread" not in inits:
        raise MergeError("no 'alpha_spread' (not a mix head built by compact.build)")
    gate = (np.asarray(alpha, dtype=np.float64)[None] @ arr("alpha_spread").astype(np.float64))[0]
    projs = [p for p in projections(g) if _key(p["A"]) not in set(keep)]
    if not projs:
        raise MergeError("no gated-LoRA projection found")
    keys = {}
    for p in projs:
        hit = re.fullmatch(r"l(\d+)\.(\w+)\.lora_A", p["A"])
        if hit is None:
            raise MergeError(f"a LoRA named '{p['A']}' (not l<layer>.<matrix>.lora_A)")
        if p["node"].op_type == "MatMulNBits":
            at = _attrs(p["node"])
            if len(p["node"].input) > 3 and any(p["node"].input[3:]) or at.get("bits") not in (4, 8):
                raise MergeError(f"'{p['node'].name}' has zero points or {at.get('bits')}-bit weights")
            keys[p["out"]] = (int(hit.group(1)), hit.group(2))
    # the float weights of the quantized projections: the base GGUF's (a float projection holds its own)
    weights = _layer_weights(Path(gguf), set(keys.values())) if keys else {}
    dropped, rename = set(), {}
    for p in projs:
        node = p["node"]
        a, b = arr(p["A"]).astype(np.float64), arr(p["B"]).astype(np.float64)  # (K, r), (r, N)
        delta = (a * gate[None, :]) @ b  # (K, N)
        if node.op_type == "MatMul":
            w = arr(node.input[1])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((w + delta).astype(w.dtype), node.input[1]))
        else:
            at = _attrs(node)
            w = weights[keys[p["out"]]]  # (K, N)
            if w.shape != (at["K"], at["N"]):
                raise MergeError(f"'{node.name}' is {at['K']}x{at['N']}, the base's matrix {w.shape}")
            block = block_size or at["block_size"]
            nbits = (bits or {}).get(keys[p["out"]], at["bits"])
            q, s = quantize_blocks((w + delta).T.astype(np.float32), nbits, block)
            q_name, s_name = node.input[1], node.input[2]
            if block != at["block_size"] or nbits != at["bits"]:
                from onnx import helper

                for name, v in (("block_size", block), ("bits", nbits)):
                    node.attribute.remove(next(a for a in node.attribute if a.name == name))
                    node.attribute.append(helper.make_attribute(name, v))
            else:
                q, s = q.reshape(arr(q_name).shape), s.reshape(arr(s_name).shape)
            if x_mean is not None and keys[p["out"]] in x_mean:  # the mean output error, taken back
                err = (w + delta).T.astype(np.float32) - dequantize_blocks(q.reshape(at["N"], -1, q.shape[-1]) if nbits == 4 else q.reshape(at["N"], -1, block), s.reshape(at["N"], -1), nbits, at["K"])
                bias = (err @ x_mean[keys[p["out"]]].astype(np.float32)).astype(np.float32)
                b_name = node.output[0] + ".bias"
                g.initializer.append(numpy_helper.from_array(bias, b_name))
                while len(node.input) < 5:
                    node.input.append("")
                node.input.append(b_name)
            inits[q_name].CopyFrom(numpy_helper.from_array(q, q_name))
            inits[s_name].CopyFrom(numpy_helper.from_array(s, s_name))
        dropped.update(n.output[0] for n in p["nodes"][1:])
        rename[p["out"]] = node.output[0]
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node if n.output[0] not in dropped]
    for n in kept:
        for j, x in enumerate(n.input):
            n.input[j] = rename.get(x, x)
    outputs = {o.name for o in g.output}
    while True:  # nodes nothing reads any more (the gate's): gone
        used = {x for n in kept for x in n.input} | outputs
        live = [n for n in kept if any(o in used for o in n.output)]
        if len(live) == len(kept):
            break
        kept = live
    del g.node[:]
    g.node.extend(kept)
    used = {x for n in kept for x in n.input}
    live_inits = [onnx.TensorProto.FromString(i.SerializeToString()) for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live_inits)
    unread = [i for i in g.input if i.name == "alpha" and i.name not in used]
    for i in unread:  # merged at one alpha: the input is gone
        g.input.remove(i)
    return m



def head_feed(session, hidden: np.ndarray, alpha) -> dict:
    """The inputs of a mix head graph (shipped or merged) run over `hidden` (seq, d) from an empty
    cache: alpha only where the graph still takes it."""
    feed = {"hidden": np.asarray(hidden, np.float32)[None], "attention_mask": np.ones((1, len(hidden)), np.int64)}
    for inp in session.get_inputs():
        if inp.name == "alpha":
            feed["alpha"] = np.asarray(alpha, np.float32)
        elif inp.name.startswith("past_key_values."):
            feed[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
    return feed


def input_means(path: Path, hiddens: list[np.ndarray], alpha) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, matrix): the mean input of that projection} of the mix head at `path` run at
    `alpha` on each (seq, d) hidden-state array of `hiddens`, over every position but the first
    (the attention sink, whose activations are hundreds of times the others')."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    projs = projections(m.graph)
    names = sorted({p["x"] for p in projs})
    for x in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    sums, count = dict.fromkeys(names, 0.0), 0
    for h in hiddens:
        for x, v in zip(names, sess.run(names, head_feed(sess, h, alpha))):
            sums[x] = sums[x] + v.reshape(-1, v.shape[-1])[1:].astype(np.float64).sum(0)
        count += len(h) - 1
    if count <= 0:
        raise MergeError("no calibration positions")
    return {_key(p["A"]): (sums[p["x"]] / count).astype(np.float32) for p in projs}


def save_calibration(path: Path, per_vertex: list[dict]) -> None:
    """The input means at each objective's vertex, as `calibration_at` reads them (npz, atomic)."""
    import os
    import tempfile

    keys = sorted(per_vertex[0])
    arrays = {f"l{layer}.{matrix}": np.stack([v[(layer, matrix)] for v in per_vertex]) for layer, matrix in keys}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def calibration_at(path: Path, alpha) -> dict[tuple[int, str], np.ndarray]:
    """The input means at `alpha`: the vertices' mixed by alpha (the LoRAs enter linearly)."""
    alpha = np.asarray(alpha, np.float64)
    try:
        with np.load(path) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception as e:  # missing, truncated, not an npz: numpy's and zipfile's own errors
        raise MergeError(f"cannot read the merge's calibration '{path}' ({type(e).__name__}: {e}): rebuild the "
                         "pack (`edge-genarm pack build NAME --force`)") from None  # fmt: skip
    out = {}
    for name, means in arrays.items():
        if means.ndim != 2 or means.shape[0] != alpha.size or _key(name + ".lora_A") is None:
            raise MergeError(f"'{path}' holds {name} {means.shape}, not means for {alpha.size} objectives: rebuild the pack")
        out[_key(name + ".lora_A")] = (alpha @ means.astype(np.float64)).astype(np.float32)
    return out
