"""edge-genarm: steer a local LLM with autoregressive reward models at decoding time."""

__version__ = "0.1.0"


def load(weights, arms=None, **kw):
    """Load a bundle (or a bare .gguf): see `edge_genarm.loader.load`."""
    from .loader import load as _load

    return _load(weights, arms, **kw)
