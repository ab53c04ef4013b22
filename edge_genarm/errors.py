"""Errors a user can act on: each message names the thing and the fix."""


class EdgeGenarmError(Exception):
    """Base class for every error edge-genarm raises on purpose."""


class ModelFileError(EdgeGenarmError):
    """A model file is missing, truncated, corrupt or of the wrong kind."""


class BundleError(EdgeGenarmError):
    """A bundle folder or its manifest is missing, malformed or inconsistent."""


class TokenizerMismatchError(BundleError):
    """An ARM's token ids differ from the base model's."""


class ContextOverflowError(EdgeGenarmError):
    """The prompt does not fit in the context window."""


class ConfigError(EdgeGenarmError, ValueError):
    """A bad option value: an unknown ARM name, a weight that is not a number..."""
