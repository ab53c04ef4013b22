"""One head for every weight vector (issue 21): the fast mode's guidance at the cost of one head.

A pack's mix head (export/train_mix.py) is the base's last K layers with a gated LoRA per
objective, conditioned on `alpha`, the objectives' weights normalized to sum 1: the ARM
pi_alpha. Guidance is then

    log p_base + S * log pi_alpha,   S = the sum of the weights

the form of `sum_i w_i log pi_i` with one head instead of one per objective. It reads the
base's own output of the layer before its first (a second tap: backends.capture), shares the
LM head of the pack's trunk, and is run by the fast mode only (`exact=True` runs the separate
ARMs, the reference). Its KV cache depends on alpha: a request with other weights evaluates
the context again, in one batch.

What it cannot serve it refuses with the reason (`MixUnit.plan`): an objective it was not
trained on, or a negative weight (alpha off the simplex it was trained on); the fast mode then
runs the separate ARMs and logs why.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .onnx_arm import KVGraph
from .units import Partial, reusable

log = logging.getLogger("edge_genarm")

MIX = "mix"  # the unit's one name: StepRecord.arm_contrib and the timings call its term this
MERGED_KEPT = 3  # merged heads kept (one per alpha): a server alternating a few mixes merges each once


class _MixGraph(KVGraph):
    feed_input = "hidden"
    out_name = "normed"


class _MergedGraph(_MixGraph):
    """A mix head merged at one alpha (backends.mix_merge), its session made from the model in memory."""

    def __init__(self, path, model_bytes: bytes, **kw):
        self._bytes = model_bytes
        super().__init__(path, MIX, **kw)

    def _session(self, opts, providers):
        import onnxruntime as ort

        self.from_cache = False
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(self._bytes, sess_options=opts, providers=providers)
        self._bytes = b""
        return session


class MixUnit:
    """The mix head as a forward unit (backends.units): `names` is (MIX,); `set_alpha` first."""

    after_base = True

    def __init__(self, path, objectives, tap_layer: int, group, device: str = "cpu", threads: int = 1, cache=True,
                 merge: bool = True, calibration=None):  # fmt: skip
        """`group`: the TrunkGroup whose LM head (and tapped base) it shares; `tap_layer`: the
        base layer whose output enters the head; `merge`: run it merged at each alpha
        (backends.mix_merge) rather than as shipped, where it can be."""
        self.graph = self.shipped = _MixGraph(path, MIX, device=device, threads=threads, cache=cache)
        self._kw = {"device": device, "threads": threads}
        self.merge: str | bool = merge  # True, False, or why merging is off
        self.calibration = calibration  # the projections' mean inputs: the merge's bias (mix_merge)
        self._merged: OrderedDict[bytes, KVGraph] = OrderedDict()
        if "alpha" not in self.graph._inputs:
            from ..errors import ModelFileError

            raise ModelFileError(f"'{path}' is not a mix head (no input 'alpha'): rebuild the pack")
        self.objectives = tuple(objectives)
        self.names = (MIX,)
        self.tap_layer = int(tap_layer)
        self.group = group
        self.path = self.graph.path
        self.alpha: np.ndarray | None = None

    def plan(self, active: dict[str, float]):
        """(alpha, strength) for the weights `active` (the non-zero ones), or a str: why this head
        cannot serve them."""
        other = [n for n in active if n not in self.objectives]
        if other:
            return f"the mix head was trained for {', '.join(self.objectives)}, not {', '.join(other)}"
        neg = {n: w for n, w in active.items() if w < 0}
        if neg:
            return (
                "negative weights (" + ", ".join(f"{n}={w:g}" for n, w in neg.items()) + ") are outside what the "
                "mix head was trained on (weights >= 0, mixed as fractions of their sum)"
            )
        s = float(sum(active.values()))
        if not s > 0:
            return "no positive weight"
        return np.array([active.get(n, 0.0) / s for n in self.objectives], dtype=np.float32), s

    def set_alpha(self, alpha: np.ndarray) -> None:
        """Condition the head on `alpha`: the head merged at it (made now, or kept from before with
        its cache), else the shipped head, whose cache was computed for another alpha: emptied."""
        alpha = np.asarray(alpha, dtype=np.float32)
        if self.alpha is not None and np.array_equal(alpha, self.alpha):
            return
        self.alpha = alpha
        merged = self._merged_at(alpha) if self.merge is True else None
        if merged is None:
            self.shipped.reset()
        self.graph = merged or self.shipped

    def _merged_at(self, alpha: np.ndarray) -> KVGraph | None:
        from .mix_merge import MergeError, calibration_at, merged_model

        key = alpha.tobytes()
        if key in self._merged:
            self._merged.move_to_end(key)
            return self._merged[key]
        t0 = time.perf_counter()
        try:
            x_mean = calibration_at(self.calibration, alpha) if self.calibration else None
            model = merged_model(self.shipped.path, Path(self.tap.path), alpha, x_mean=x_mean)
            graph = _MergedGraph(self.shipped.path, model.SerializeToString(), **self._kw)
        except MergeError as e:
            self.merge = str(e)
            log.warning("the mix head runs as shipped, its LoRAs beside its weights: %s", e)
            return None
        log.debug("mix head merged at alpha %s in %.2f s", np.round(alpha, 4).tolist(), time.perf_counter() - t0)
        self._merged[key] = graph
        while len(self._merged) > MERGED_KEPT:
            self._merged.popitem(last=False)
        return graph

    @property
    def tap(self):
        return self.group.tap

    def run(self, kind: str, arg, names=None, ids: np.ndarray | None = None) -> dict:
        if self.alpha is None:
            raise RuntimeError("MixUnit.set_alpha must come before a forward")
        base = self.tap
        tokens = list(arg) if kind == "prefill" else base.tokens
        if base.tokens != tokens:
            base.prefill(tokens)
        hidden = base.hidden_at(self.tap_layer)
        g = self.graph
        keep = reusable(g.tokens, tokens)
        g.truncate(keep)
        extra = {"alpha": self.alpha} if "alpha" in g._inputs else None
        normed = g.feed(tokens[keep:], hidden[None, keep : len(tokens)], extra=extra)[-1]
        g.n_exact = min(g.n_exact, base.n_exact)
        rows = self.group.lm_rows() if ids is not None else None
        if rows is not None:
            ids = ids[ids < rows.size]
            return {MIX: Partial(ids, rows.logits(normed[None], ids)[0], rows.size)}
        try:
            logits = self.group.lm.session.run(None, {"normed": normed[None, None, :]})[0]
        except Exception as e:  # onnxruntime's own error types
            raise self.group.lm.run_error(e) from None
        return {MIX: logits[0, -1]}

    def prefill(self, tokens: list[int], names=None, ids=None) -> dict:
        return self.run("prefill", tokens, names, ids)

    def step(self, token: int, names=None, ids=None) -> dict:
        return self.run("step", token, names, ids)

    def trim_for(self, tokens: list[int], names=None) -> None:
        self.graph.truncate(min(reusable(self.tap.tokens, tokens, self.tap.n_exact), self.graph.exact_keep(tokens)))

    def reset(self) -> None:
        self.shipped.reset()
        for g in self._merged.values():
            g.reset()

    @property
    def graphs(self) -> list:
        return [self.shipped, *self._merged.values()]
