"""Models as clients see them: the bundle under one name, and presets as model ids."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .params import ApiError


@dataclass
class Preset:
    """A model id: the engine with these weights over its defaults, guidance on or off."""

    id: str
    weights: dict[str, float] = field(default_factory=dict)
    guidance: bool = True
    about: str = ""


def model_name(engine) -> str:
    """A short id from the GGUF metadata (general.basename, else general.name, else the file)."""
    info = engine.base.info
    raw = info.get("general.basename") or info.get("general.name") or engine.base.path.stem
    return re.sub(r"[^a-z0-9._-]+", "-", str(raw).lower()).strip("-") or "model"


class Models:
    """`<name>` (the server's defaults), `<name>+<arm>` (that ARM alone: its default weight, or 1
    when the default is 0) and `<name>+base` (no guidance), for front-ends that can only pick a model."""

    def __init__(self, engine, name: str, guidance: bool = True):
        self.name = name
        d = engine.weights
        self.presets = [Preset(name, {}, guidance, "the server's default weights")]
        for arm in engine.arms:
            w = {a: 0.0 for a in engine.arms} | {arm: d.get(arm) or 1.0}
            self.presets.append(Preset(f"{name}+{arm}", w, True, f"ARM '{arm}' alone"))
        if engine.arms and "base" not in engine.arms:
            self.presets.append(Preset(f"{name}+base", {}, False, "the base model alone"))
        self._by_id = {p.id: p for p in self.presets}

    def resolve(self, model) -> Preset:
        if model is None:
            return self.presets[0]
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model")
        p = self._by_id.get(model.removesuffix(":latest"))
        if p is None:
            have = ", ".join(self._by_id)
            raise ApiError(404, f"model '{model}' does not exist: this server has {have}", "model",
                           "model_not_found")  # fmt: skip
        return p
