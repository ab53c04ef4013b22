"""Forward units: what the engine runs once per step, and the one rule for reusing a KV cache.

A unit computes the logits of one or more ARMs:

- a lone ARM (`ArmUnit` around an `OnnxARM`): its own graph;
- heads sharing a trunk (`backends.trunk.TrunkGroup`): the trunk once, then the active heads.

Every unit has the same contract (`Unit`), so the engine holds a list of them and never asks
which kind it has. The base (`LlamaBase`) follows the same calls but returns its logits alone.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


def reusable(cached: list[int], tokens: list[int], n_exact: int | None = None) -> int:
    """How many leading cached positions a forward over `tokens` keeps: the prefix shared with
    `tokens`, leaving at least one token to evaluate (its logits are the answer).

    With `n_exact` (a seeded request: LlamaBase.trim_for says why), only positions a cold prefill
    computes bit for bit: also within the first `n_exact`, and leaving >= 2 to evaluate in a batch.
    """
    n = min(len(cached), len(tokens))
    i = 0
    while i < n and cached[i] == tokens[i]:
        i += 1
    if n_exact is None:
        return min(i, len(tokens) - 1)
    return min(i, n_exact, max(0, len(tokens) - 2))


class Partial(NamedTuple):
    """An ARM's logits on some token ids only (the fast mode's restricted LM head, fastmode.py):
    `z[j]` is the logit of `ids[j]`; `size` is the ARM's vocabulary."""

    ids: np.ndarray
    z: np.ndarray
    size: int


class Unit(Protocol):
    """The forward-unit contract. `names` may be any non-empty subset of the unit's ARMs."""

    names: tuple[str, ...]  # the ARMs whose logits this unit computes
    after_base: bool  # it reads the base's own layer output: run it after the base's forward

    def prefill(self, tokens: list[int], names, ids=None) -> dict[str, np.ndarray]:
        """Evaluate `tokens` (reusing the cached prefix, `reusable`): {name: last-position logits}.
        `ids` (fast mode): the logits of these token ids are enough; a unit may then return a
        `Partial` instead of the whole vocabulary's (or ignore it)."""

    def step(self, token: int, names, ids=None) -> dict[str, np.ndarray]:
        """Evaluate one more token: {name: its logits} (`ids` as for prefill)."""

    def trim_for(self, tokens: list[int], names) -> None:
        """Drop cached positions a cold prefill of `tokens` would compute differently."""

    def reset(self) -> None:
        """Empty every cache of the unit."""

    @property
    def graphs(self) -> list:
        """The ONNX graphs the unit runs (each has `.path`)."""


class ArmUnit:
    """A lone ARM as a forward unit."""

    after_base = False

    def __init__(self, arm):
        self.arm = arm
        self.names = (arm.name,)

    def prefill(self, tokens: list[int], names=None, ids=None) -> dict[str, np.ndarray]:
        return {self.arm.name: self.arm.prefill(tokens)}  # one graph computes its whole LM head

    def step(self, token: int, names=None, ids=None) -> dict[str, np.ndarray]:
        return {self.arm.name: self.arm.step(token)}

    def trim_for(self, tokens: list[int], names=None) -> None:
        self.arm.trim_for(tokens)

    def reset(self) -> None:
        self.arm.reset()

    @property
    def graphs(self) -> list:
        return [self.arm]
