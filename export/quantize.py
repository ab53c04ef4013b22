"""Weight-only quantization of ARM graphs with onnxruntime's MatMulNBits quantizer.

Every MatMul with a constant weight becomes MatMulNBits (int4 or int8 blocks along the
input dimension, one float scale per block), the embedding Gather becomes
GatherBlockQuantized. A tied LM head is exported as Transpose(embedding): that weight
is not a constant, so the quantizer would skip it and keep the fp32 embedding alive
for it. It is folded into a constant first, then quantized like the rest, and the fp32
embedding disappears from the file.
"""

from __future__ import annotations

import logging

from edge_genarm.errors import BundleError, ConfigError

KINDS = {"int4": 4, "int8": 8}
QUANTIZED_OPS = {
    "MatMulNBits",
    "GatherBlockQuantized",
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "QLinearMatMul",
}


def check_options(kind: str, block_size: int, accuracy_level: int) -> int:
    if kind not in KINDS:
        raise ConfigError(f"--quantize must be one of {', '.join(KINDS)}, got {kind!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"--block-size must be a power of two >= 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(
            f"--accuracy-level must be 0-4 (4: int8 activations, fastest on CPU), got {accuracy_level}"
        )
    return KINDS[kind]


def fold_constant_transposes(model) -> int:
    """Transpose(initializer) -> a new initializer, so MatMuls reading it have a constant weight."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    sources = set()
    for node in list(g.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        arr = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        g.initializer.append(numpy_helper.from_array(arr.transpose(perm).copy(), node.output[0]))
        g.node.remove(node)
        sources.add(node.input[0])
    used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    for init in list(g.initializer):
        if init.name in sources and init.name not in used:  # only a weight the fold left unread
            g.initializer.remove(init)
    return len(sources)


def quantize_model(
    model,
    kind: str = "int4",
    block_size: int = 32,
    accuracy_level: int = 4,
    what: str = "ARM",
    embed_kind=None,
    copy: bool = True,
):
    """A weight-only quantized copy of `model` (a ModelProto): MatMul weights in `kind`, the
    embedding in `embed_kind` (default: `kind`). Refuses a graph that is already quantized or
    has no MatMul weight to quantize. `copy=False` works on `model` itself (a graph read from a
    file only to be quantized: its fp32 weights are not held twice)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    check_options(kind, block_size, accuracy_level)
    check_options(embed_kind or kind, block_size, accuracy_level)
    done = sorted({n.op_type for n in model.graph.node} & QUANTIZED_OPS)
    if done:
        raise BundleError(
            f"{what} is already quantized ({', '.join(done)} nodes): quantize the fp32 export instead "
            "(re-export it without --quantize, then with)"
        )
    m = model
    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    fold_constant_transposes(m)
    inits = {i.name for i in m.graph.initializer}
    if not any(n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits for n in m.graph.node):
        raise BundleError(f"{what} has no MatMul with a constant weight: there is nothing to quantize")
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs a line per node
    try:
        for op, axis, k in (("MatMul", 0, kind), ("Gather", 1, embed_kind or kind)):
            if op == "Gather" and KINDS[k] != 4:
                continue  # GatherBlockQuantized is 4-bit only: an int8 ARM keeps its fp32 embedding
            cfg = DefaultWeightOnlyQuantConfig(
                block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                op_types_to_quantize=(op,), quant_axes=((op, axis),), bits=KINDS[k],
            )  # fmt: skip
            # a mix head's gated LoRA (export/compact.py, nodes named '/lora_...') stays float: its
            # matrices are rank 16-32, cost nothing at one position, and carry the whole objective
            skip = [n.name for n in m.graph.node if "/lora_" in n.name]
            q = MatMulNBitsQuantizer(m, nodes_to_exclude=skip, algo_config=cfg)
            q.process()
            m = q.model.model
    finally:
        quiet.setLevel(level)
    out = m
    used = {t for n in out.graph.node for t in n.input}
    for init in list(out.graph.initializer):  # the fp32 weights the quantized nodes replaced
        if init.name not in used:
            out.graph.initializer.remove(init)
    return out
