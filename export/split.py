"""Sibling ARMs -> one shared trunk graph + a head graph per ARM + one shared LM-head graph.

ARMs trained as LoRA adapters on the last layers of one init compute the same first
layers: their ONNX graphs (same exporter, same architecture) have byte-identical
weights up to the first adapted layer. Cut every graph there, by the graph's own
nodes, so the pieces compute exactly what the whole graph did:

    trunk:  input_ids, attention_mask, position_ids, past 0..k-1  ->  hidden (layer k's input), present 0..k-1
    head:   hidden, attention_mask, position_ids, past k..L-1      ->  normed (LM head's input), present k..L-1
    lmhead: normed                                                 ->  logits

The trunk and the LM head are written once (when they are the same in every sibling),
a head per ARM. At run time (backends/trunk.py) the trunk runs once per step for all
active heads, and the LM head once for all of them, as one batch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from edge_genarm.export.onnx_io import save_model

from edge_genarm.errors import BundleError

_LAYER = re.compile(r"(?:^|/)(?:model/)?layers\.(\d+)(?:/|$)")


@dataclass
class SplitPlan:
    layer: int  # the first layer that differs between siblings: the trunk is layers [0, layer)
    n_layers: int
    hidden: str  # tensor name of layer `layer`'s input
    normed: str  # tensor name of the LM head's input
    lm_weight: str  # the LM head's weight initializer
    emb_out: str  # the embedding lookup's output (the head's Shape ops read it: same shape as hidden)
    trunk_sha: str  # identifies the trunk's weights (recorded with every head)


def _layer_of(node) -> int | None:
    m = _LAYER.search(node.name or "")
    return int(m.group(1)) if m else None


def _tensor_hashes(model) -> dict[str, str]:
    from onnx import numpy_helper

    out = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        out[init.name] = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
    return out


def _consumers(graph) -> dict[str, list]:
    """tensor -> nodes reading it, looking through Identity (the exporter aliases shared weights)."""
    direct: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            direct.setdefault(name, []).append(node)
    out = {}
    for name in direct:
        todo, found = list(direct[name]), []
        while todo:
            n = todo.pop()
            if n.op_type == "Identity":
                todo.extend(direct.get(n.output[0], []))
            else:
                found.append(n)
        out[name] = found
    return out


def _lm_head(graph):
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get("logits")
    if node is None or node.op_type != "MatMul":
        raise BundleError(
            "the ARM graph's 'logits' do not come from one MatMul (the LM head): cannot split it"
        )
    return node


def plan_split(models: dict[str, object], layer: int | None = None) -> SplitPlan:
    """Where sibling ARM graphs can be cut: the first layer whose weights differ between them.

    `layer` cuts at a given layer instead: the first one the ARMs' training changed (a LoRA on
    the last N of L layers changed L-N on). One ARM has no sibling to compare with, so it needs
    it; with siblings, it may not lie past the first layer where they differ."""
    names = list(models)
    g = models[names[0]].graph
    sig = [(n.op_type, tuple(n.input), tuple(n.output)) for n in g.node]
    for n in names[1:]:
        if [(x.op_type, tuple(x.input), tuple(x.output)) for x in models[n].graph.node] != sig:
            raise BundleError(
                f"ARMs '{names[0]}' and '{n}' are not the same architecture exported the same way: "
                "they cannot share a trunk; export them as separate ARMs"
            )
    layers = {_layer_of(node) for node in g.node} - {None}
    if not layers:
        raise BundleError("the ARM graph has no nodes named by layer (.../layers.N/...): cannot split it")
    n_layers = max(layers) + 1
    hashes = {n: _tensor_hashes(m) for n, m in models.items()}
    cons = _consumers(g)
    lm = _lm_head(g)
    if len(names) == 1 and layer is None:
        raise BundleError(
            f"one ARM ('{names[0]}') has no sibling to find its trunk by: give the first layer its "
            "training changed (--layer, e.g. L-N for a LoRA on its last N of L layers)"
        )
    if layer is not None and not 0 < layer < n_layers:
        raise BundleError(f"--layer must be between 1 and {n_layers - 1} (the ARM has {n_layers} layers), got {layer}")
    differ = n_layers - 1 if layer is None else layer  # identical throughout: still give every ARM its last layer
    for init, h in hashes[names[0]].items():
        if all(hashes[n].get(init) == h for n in names[1:]):
            continue
        where = {_layer_of(c) for c in cons.get(init, [])}
        if None in where:  # the embedding, final norm or LM head differ: nothing to share
            raise BundleError(
                f"ARMs {', '.join(names)} differ outside their layers ('{init}'): there is no shared "
                "trunk and LM head; export them as separate ARMs"
            )
        if layer is not None and min(where) < layer:
            raise BundleError(
                f"ARMs {', '.join(names)} differ at layer {min(where)}, before --layer {layer}: "
                f"cut at {min(where)} or lower"
            )
        differ = min(differ, min(where))
    if differ == 0:
        raise BundleError(
            f"ARMs {', '.join(names)} differ from their first layer on: there is no shared trunk; "
            "export them as separate ARMs"
        )
    producer = {o: n for n in g.node for o in n.output}
    producer_layer = {o: _layer_of(n) for o, n in producer.items()}
    hidden = sorted(
        {
            t
            for node in g.node
            if _layer_of(node) == differ
            for t in node.input
            if producer_layer.get(t) == differ - 1
        }
    )
    # the residual stream is an Add; the exporter may also reuse a layer's rotary Unsqueezes later on
    hidden = [t for t in hidden if producer[t].op_type == "Add"]
    if len(hidden) != 1:
        raise BundleError(f"cannot find one hidden-state tensor entering layer {differ} (found {hidden})")
    emb = [n for n in g.node if n.op_type == "Gather" and "input_ids" in n.input]
    if len(emb) != 1:
        raise BundleError("cannot find the embedding lookup (a Gather of input_ids) in the ARM graph")
    trunk_inits = sorted(
        i for i, cs in cons.items() if i in hashes[names[0]] and any((_layer_of(c) or 0) < differ for c in cs)
    )
    trunk_sha = hashlib.sha256("".join(hashes[names[0]][i] for i in trunk_inits).encode()).hexdigest()[:16]
    return SplitPlan(differ, n_layers, hidden[0], lm.input[0], lm.input[1], emb[0].output[0], trunk_sha)


def _rename(model, names: dict[str, str]) -> None:
    for node in model.graph.node:
        for seq in (node.input, node.output):
            for j, t in enumerate(seq):
                if t in names:
                    seq[j] = names[t]
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in names:
            v.name = names[v.name]


def extract(model, inputs: list[str], outputs: list[str], alias: dict[str, str], shapes: dict[str, list]):
    """The subgraph of `model` computing `outputs` from `inputs` (+ initializers): its own nodes.

    `alias` maps a tensor outside the cut to an input of the same shape, for the shape-only
    ops that read it (the causal mask reads the sequence length from the embedding output and
    the past length from layer 0's cache). Anything else outside the cut is an error.
    """
    import onnx
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    want, seen, keep = list(outputs), set(inputs), set()
    while want:
        t = want.pop()
        t = alias.get(t, t)
        if t in seen or t == "" or t in inits:
            continue
        seen.add(t)
        node = producer.get(t)
        if node is None:
            raise BundleError(
                f"the cut needs '{t}', which is neither an input nor computed: cannot split here"
            )
        keep.add(id(node))
        want.extend(node.input)
    nodes = []
    for n in g.node:
        if id(n) in keep:
            new = onnx.NodeProto()
            new.CopyFrom(n)
            for j, t in enumerate(new.input):
                new.input[j] = alias.get(t, t)
            nodes.append(new)
    used = {t for n in nodes for t in n.input}
    vi = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info)}

    def info(name):
        if name in vi:
            return vi[name]
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shapes.get(name))

    graph = helper.make_graph(
        nodes,
        g.name,
        [info(i) for i in inputs],
        [info(o) for o in outputs],
        [inits[i] for i in inits if i in used],
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def split_model(model, plan: SplitPlan):
    """(trunk, head, lm_head) ModelProtos of one ARM graph, with canonical io names."""
    g = model.graph
    past = [i.name for i in g.input if i.name.startswith("past_key_values.")]
    pres = [o.name for o in g.output if o.name.startswith("present.")]

    def idx(name):
        return int(name.split(".")[1])

    k, d = plan.layer, _hidden_size(model, plan)
    others = [i.name for i in g.input if i.name in ("attention_mask", "position_ids")]
    shape = {
        plan.hidden: ["batch_size", "sequence_length", d],
        plan.normed: ["batch_size", "sequence_length", d],
    }
    trunk = extract(
        model,
        ["input_ids", *others, *[p for p in past if idx(p) < k]],
        [plan.hidden, *[p for p in pres if idx(p) < k]],
        {},
        shape,
    )
    head = extract(
        model,
        [plan.hidden, *others, *[p for p in past if idx(p) >= k]],
        [plan.normed, *[p for p in pres if idx(p) >= k]],
        {plan.emb_out: plan.hidden, "past_key_values.0.key": f"past_key_values.{k}.key",
         "past_key_values.0.value": f"past_key_values.{k}.value"},
        shape,
    )  # fmt: skip
    lm = extract(model, [plan.normed], ["logits"], {}, shape)
    _rename(trunk, {plan.hidden: "hidden"})
    _rename(head, {plan.hidden: "hidden", plan.normed: "normed"})
    _rename(lm, {plan.normed: "normed"})
    return trunk, head, lm


def _hidden_size(model, plan: SplitPlan) -> int:
    for init in model.graph.initializer:
        if init.name == plan.lm_weight:
            return int(init.dims[0])
    raise BundleError(f"the LM head weight '{plan.lm_weight}' is not an initializer: cannot split")


def _stamp(model, **meta) -> None:
    from onnx import helper

    del model.metadata_props[:]
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})


def split_siblings(
    onnx_paths: dict[str, Path], out: Path, compact: bool = True, layer: int | None = None
) -> tuple[SplitPlan, dict[str, Path], str]:
    """Cut sibling ARM graphs into out/trunk.onnx, out/lmhead.onnx and out/heads/<name>/head.onnx.

    Returns (plan, head files, form): form "compact" when the graphs are optimum Llama exports
    (rebuilt with fused ops, export/compact.py), else "cut" (the graphs' own nodes, extract()).
    """
    import onnx

    if len(onnx_paths) < 1:
        raise BundleError("no ARMs to split")
    from edge_genarm.export.quantize import fold_constant_transposes

    models = {n: onnx.load(str(p)) for n, p in onnx_paths.items()}
    for m in models.values():  # a tied LM head reads Transpose(embedding): give it its own weight
        fold_constant_transposes(m)
    plan = plan_split(models, layer)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(edge_genarm_trunk=plan.trunk_sha, edge_genarm_trunk_layers=plan.layer)
    pieces, form = None, "cut"
    if compact:
        try:
            pieces, form = _compact_pieces(models, plan, meta), "compact"
        except BundleError:
            pieces = None  # not a plain Llama export: keep the graphs' own nodes
    if pieces is None:
        pieces = _cut_pieces(models, plan, meta)
    trunk, lm, heads = pieces
    save_model(trunk, out / "trunk.onnx")
    save_model(lm, out / "lmhead.onnx")
    files = {}
    for name, head in heads.items():
        files[name] = out / "heads" / name / "head.onnx"
        files[name].parent.mkdir(parents=True, exist_ok=True)
        save_model(head, files[name])
    return plan, files, form


def _cut_pieces(models: dict, plan: SplitPlan, meta: dict):
    heads, trunk, lm = {}, None, None
    for name, model in models.items():
        t, head, lm_ = split_model(model, plan)
        if trunk is None:
            trunk, lm = t, lm_
            _stamp(trunk, part="trunk", **meta)
            _stamp(lm, part="lm_head", **meta)
        _stamp(head, part="head", arm=name, **meta)
        heads[name] = head
    return trunk, lm, heads


def _compact_pieces(models: dict, plan: SplitPlan, meta: dict):
    from edge_genarm.export.compact import build, lm_head_graph, read_llama

    weights = {n: read_llama(m) for n, m in models.items()}
    first = next(iter(weights.values()))
    trunk = build(first, 0, plan.layer, True, "hidden", {**meta, "part": "trunk"})
    lm = lm_head_graph(first, {**meta, "part": "lm_head"})
    heads = {
        n: build(w, plan.layer, plan.n_layers, False, "normed", {**meta, "part": "head", "arm": n})
        for n, w in weights.items()
    }
    return trunk, lm, heads
