"""edge-genarm: steer a local LLM with autoregressive reward models at decoding time."""

__version__ = "0.1.0"


def load(weights, arms=None, **kw):
    """Load a bundle (or a bare .gguf) into an Engine: `load(path, arms=..., n_ctx=..., base=...)`
    or `load(LoadOptions(...))`; see `edge_genarm.options.LoadOptions` for every option."""
    from .loader import load as _load

    return _load(weights, arms, **kw)


def __getattr__(name):
    if name == "LoadOptions":  # imported on use: `import edge_genarm` stays free of NumPy
        from .options import LoadOptions

        return LoadOptions
    raise AttributeError(f"module 'edge_genarm' has no attribute {name!r}")
