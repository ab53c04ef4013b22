"""Sibling ARMs on one shared trunk: the trunk runs once per step for all active heads.

Files (export/split.py cuts them from the ARMs' own graphs, so they compute exactly
what each whole ARM did):

    trunk.onnx   token ids -> hidden state entering the first adapted layer   (KV cache)
    <arm>.onnx   hidden state -> normed hidden state, per ARM                 (KV cache)
    lmhead.onnx  normed hidden states of all active heads -> logits, as one batch

The trunk keeps the hidden states of every position it has cached, so a head turned on
mid-conversation (its weight was 0) catches up from them without running the trunk
again; a head at weight 0 costs nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from .onnx_arm import KVGraph, OnnxGraph
from .units import Partial, reusable

log = logging.getLogger("edge_genarm")


class _Trunk(KVGraph):
    out_name = "hidden"


class _Head(KVGraph):
    feed_input = "hidden"
    out_name = "normed"


class LMRows:
    """The LM head's weight rows in numpy, for logits on a few token ids (the fast mode's
    candidate-restricted head): `logits(normed (k, d), ids)` -> (k, len(ids)).

    Reads what the pack's LM-head graphs hold: one MatMul on a float weight (d, V), or one
    MatMulNBits (4 or 8 bits, any block size, with or without zero points), whose rows are
    dequantized as needed: (q - zero point) * scale, per block. ORT's int4 kernel at accuracy
    level 4 also rounds the activations to int8 per block; this computes in float32, so its
    logits differ from the graph's by that rounding (tests/test_fastmode.py bounds it)."""

    def __init__(self, path: Path):
        import onnx
        from onnx import helper, numpy_helper

        m = onnx.load(str(path))  # external data too
        nodes = [n for n in m.graph.node if n.op_type in ("MatMul", "MatMulNBits")]
        if len(nodes) != 1 or len(m.graph.node) != 1:
            raise ValueError(f"'{path}' is not one MatMul: its rows cannot be read")
        node = nodes[0]
        inits = {i.name: i for i in m.graph.initializer}
        arr = {n: numpy_helper.to_array(inits[n]) for n in node.input[1:] if n}
        self.kind = node.op_type
        if self.kind == "MatMul":
            self.w = np.ascontiguousarray(arr[node.input[1]].T)  # (V, d)
            self.size = self.w.shape[0]
            return
        at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.bits, self.block, self.k, self.size = at["bits"], at["block_size"], at["K"], at["N"]
        if self.bits not in (4, 8):
            raise ValueError(f"'{path}': {self.bits}-bit weights are not read")
        self.q = arr[node.input[1]].reshape(self.size, -1)  # (V, blocks * block * bits / 8) uint8
        self.blocks = -(-self.k // self.block)
        self.scales = arr[node.input[2]].reshape(self.size, self.blocks).astype(np.float32)
        zp = arr.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if zp is None:
            self.zp = None  # symmetric: the zero point is 2^(bits-1)
        elif self.bits == 4:
            zp = zp.reshape(self.size, -1)
            self.zp = np.stack([zp & 0xF, zp >> 4], -1).reshape(self.size, -1)[:, : self.blocks].astype(np.float32)
        else:
            self.zp = zp.reshape(self.size, self.blocks).astype(np.float32)
        self._kept, self._have, self._n_kept = None, None, 0

    # Dequantized rows are kept (the base's likeliest tokens recur from step to step: dequantizing
    # 129 rows was 0.25 of the 0.3 ms a step spent here). The table is allocated zeroed, so only
    # the pages of rows written cost memory; past ROWS_KEPT rows it starts again, empty.
    ROWS_KEPT = 8192  # 18 MB of float32 rows at d = 576

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The weight rows of `ids`, (len(ids), d) float32."""
        if self.kind == "MatMul":
            return self.w[ids]
        if self._kept is None or self._n_kept > self.ROWS_KEPT:
            self._kept = np.zeros((self.size, self.k), dtype=np.float32)
            self._have = np.zeros(self.size, dtype=bool)
            self._n_kept = 0
        new = np.unique(ids[~self._have[ids]])
        if new.size:
            self._kept[new] = self._dequantize(new)
            self._have[new] = True
            self._n_kept += new.size
        return self._kept[ids]

    def _dequantize(self, ids: np.ndarray) -> np.ndarray:
        q = self.q[ids]
        if self.bits == 4:
            q = np.stack([q & 0xF, q >> 4], -1).reshape(len(ids), -1)
        q = q.reshape(len(ids), self.blocks, self.block).astype(np.float32)
        zp = self.zp[ids][:, :, None] if self.zp is not None else np.float32(1 << (self.bits - 1))
        return ((q - zp) * self.scales[ids][:, :, None]).reshape(len(ids), -1)[:, : self.k]

    def logits(self, normed: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return normed @ self.rows(ids).T


def _trunk_id(graph: OnnxGraph) -> str | None:
    return graph.session.get_modelmeta().custom_metadata_map.get("edge_genarm_trunk")


class TrunkGroup:
    """One trunk, the heads on it, and the shared LM head: a forward unit (backends.units) whose
    `prefill(tokens, names)` / `step(token, names)` return {name: last-position logits} for the
    named heads, running the trunk once for all of them."""

    def __init__(
        self,
        trunk: str | Path,
        heads: dict[str, str | Path],
        lm_head: str | Path,
        device: str = "cpu",
        threads: int = 1,
        label: str = "trunk",
        cache: bool = True,
        on_base: bool = False,
    ):
        """`on_base`: the heads run on the base's own trunk: the output of the layer before them,
        kept by the base as it decodes (a LlamaBase loaded with `tap`, attached with
        `attach`), and the trunk graph is not loaded. The manifest's `base_tap` record says the
        trunk is the base's own layers and how far the two drift (export/share.py)."""
        from concurrent.futures import ThreadPoolExecutor

        self.tap, self.on_base = None, on_base
        self.after_base = on_base  # the heads read the base's own layer: they wait for its forward
        kw = dict(device=device, threads=threads, cache=cache)
        with ThreadPoolExecutor(max_workers=2) as pool:  # sessions are created side by side (warm start)
            t = pool.submit(_Trunk, trunk, f"{label} trunk", **kw) if not on_base else None
            hs = {n: pool.submit(_Head, p, n, **kw) for n, p in heads.items()}
            lm = pool.submit(OnnxGraph, lm_head, f"{label} LM head", **kw)
            self.trunk = t.result() if t else None
            self.heads, self.lm = {n: f.result() for n, f in hs.items()}, lm.result()
        self.threads = threads
        self.names = tuple(heads)
        first = self.trunk or self.lm
        want = _trunk_id(first)
        for graph in [*self.heads.values(), self.lm]:
            if _trunk_id(graph) != want:
                raise ModelFileError(
                    f"'{graph.path}' was cut from another init than its trunk '{first.path}' (trunk "
                    f"{_trunk_id(graph)} vs {want}): re-export these ARMs with `edge-genarm export share-trunk`"
                )
        lm_in = self.lm.session.get_inputs()
        if len(lm_in) != 1 or lm_in[0].name != "normed":
            raise ModelFileError(
                f"'{lm_head}' is not an LM-head graph (one input 'normed'): re-export the ARMs"
            )
        shape = self.lm.session.get_outputs()[0].shape
        self.vocab_size = shape[-1] if isinstance(shape[-1], int) else None
        self._buf = np.zeros((0, 0), dtype=np.float32)  # trunk outputs, room to grow (no copy per step)
        self._n = 0  # positions of _buf in use: one per token the trunk has cached
        self._rows: LMRows | None | bool = None  # the LM head in numpy, read at its first use (False: cannot)

    def reset(self) -> None:
        if self.trunk is not None:
            self.trunk.reset()
        for h in self.heads.values():
            h.reset()
        self._n = 0

    @property
    def hidden(self) -> np.ndarray:
        """The trunk's output at every cached position, (positions, hidden)."""
        return self.tap.hidden if self.tap is not None else self._buf[: self._n]

    def attach(self, base) -> None:
        if getattr(base, "capture", None) is None:
            raise ValueError("the base was loaded without a tap")
        self.tap = base

    def _append(self, keep: int, new: np.ndarray) -> None:
        need = keep + len(new)
        if need > len(self._buf) or self._buf.shape[1] != new.shape[1]:
            grown = np.zeros((max(2 * len(self._buf), need, 64), new.shape[1]), dtype=np.float32)
            if keep:
                grown[:keep] = self._buf[:keep]
            self._buf = grown
        self._buf[keep:need] = new
        self._n = need

    def _advance_trunk(self, tokens: list[int]) -> None:
        keep = reusable(self.trunk.tokens, tokens)
        self.trunk.truncate(keep)
        self._append(keep, self.trunk.feed(list(tokens[keep:])))

    def _source(self, kind: str, arg):
        """The whole sequence after this call, with the trunk (or the tapped base) advanced to it;
        and how many leading positions were computed in batches (exact, see LlamaBase.trim_for)."""
        if self.tap is not None:  # the engine decoded the base first; standalone callers did not
            tokens = list(arg) if kind == "prefill" else self.tap.tokens
            if self.tap.tokens != tokens:
                self.tap.prefill(tokens)
            return tokens, self.tap.n_exact
        tokens = list(arg) if kind == "prefill" else self.trunk.tokens + [int(arg)]
        if kind == "prefill" or len(self.trunk.tokens) != self._n:
            self._advance_trunk(tokens)
        else:
            self._append(self._n, self.trunk.feed([int(arg)]))
        return tokens, self.trunk.n_exact

    def lm_rows(self) -> LMRows | None:
        """The LM head's rows in numpy, or None where they cannot be read (no `onnx` package, a
        graph that is not one MatMul): then a restricted run computes every logit."""
        if self._rows is None:
            try:
                self._rows = LMRows(self.lm.path)
            except (ImportError, ValueError, KeyError) as e:
                log.info("LM head '%s' runs whole in the fast mode: %s", self.lm.path, e)
                self._rows = False
        return self._rows or None

    def run(self, kind: str, arg, names: list[str], ids: np.ndarray | None = None) -> dict:
        """{name: last-position logits}; with `ids`, {name: Partial} holding only those ids' logits
        (computed in numpy from the LM head's rows, when they can be read)."""
        tokens, exact = self._source(kind, arg)
        hidden = self.hidden
        normed = []
        for n in names:
            head = self.heads[n]
            keep = reusable(head.tokens, tokens)
            head.truncate(keep)
            normed.append(head.feed(tokens[keep:], hidden[None, keep : len(tokens)])[-1])
            head.n_exact = min(head.n_exact, exact)  # exact only on exact hidden states
        rows = self.lm_rows() if ids is not None else None
        if rows is not None:
            ids = ids[ids < rows.size]
            z = rows.logits(np.stack(normed).reshape(len(names), -1), ids)
            return {n: Partial(ids, z[i], rows.size) for i, n in enumerate(names)}
        try:
            logits = self.lm.session.run(None, {"normed": np.stack(normed)[:, None, :]})[0]
        except Exception as e:  # onnxruntime's own error types
            raise self.lm.run_error(e) from None
        return {n: logits[i, -1] for i, n in enumerate(names)}

    def prefill(self, tokens: list[int], names, ids=None) -> dict:
        return self.run("prefill", tokens, names, ids)

    def step(self, token: int, names, ids=None) -> dict:
        return self.run("step", token, names, ids)

    @property
    def graphs(self) -> list:
        return [g for g in (self.trunk, self.lm, *self.heads.values()) if g is not None]

    def trim_for(self, tokens: list[int], names: list[str]) -> None:
        """As LlamaBase.trim_for, for the trunk and the named heads."""
        if self.tap is not None:  # the engine trims the base itself
            keep = reusable(self.tap.tokens, tokens, self.tap.n_exact)
        else:
            keep = self.trunk.exact_keep(tokens)
            self.trunk.truncate(keep)
            self._n = min(self._n, keep)
        for n in names:
            head = self.heads[n]
            head.truncate(min(keep, head.exact_keep(tokens)))

    def sequence_logits(self, name: str, tokens: list[int]) -> np.ndarray:
        """Logits at every position of `tokens` from empty caches (export checks)."""
        self.reset()
        if self.tap is not None:
            self.tap.prefill(list(tokens))
        else:
            self._advance_trunk(list(tokens))
        normed = self.heads[name].feed(list(tokens), self.hidden[None])
        return self.lm.session.run(None, {"normed": normed[None]})[0][0]


class HeadARM:
    """One ARM of a TrunkGroup, usable wherever an OnnxARM is (`prefill`/`step`); its `unit` is
    the group, which the engine runs once per step for all of the group's active heads."""

    def __init__(self, group: TrunkGroup, name: str):
        self.group, self.name = group, name
        self.unit = group
        self.path = group.heads[name].path
        self.threads = group.threads
        self.vocab_size = group.vocab_size

    def reset(self) -> None:
        self.group.heads[self.name].reset()

    def prefill(self, tokens: list[int]) -> np.ndarray:
        return self.group.run("prefill", tokens, [self.name])[self.name]

    def step(self, token: int) -> np.ndarray:
        return self.group.run("step", token, [self.name])[self.name]

    def trim_for(self, tokens: list[int]) -> None:
        self.group.trim_for(tokens, [self.name])

    def logits_from(self, tokens: list[int], start: int) -> tuple[int, np.ndarray]:
        """As OnnxARM.logits_from; a head evaluates every position afresh (first = 0)."""
        return 0, self.group.sequence_logits(self.name, tokens)
