"""Typed exceptions raised by every layer of jaxinfer.

Scripts catch `JaxinferError` and print one `error: ...` line with exit status 2;
the server maps `BadRequestError` to HTTP 400. Each message names the bad value.
"""


class JaxinferError(Exception):
    """Base class for every error jaxinfer raises on bad input."""


class ConfigError(JaxinferError, ValueError):
    """A model or run configuration is invalid or inconsistent."""


class CheckpointError(JaxinferError, OSError):
    """A checkpoint directory is missing, not Orbax, or does not match the model."""


class ConversionError(JaxinferError, ValueError):
    """A foreign weight file (GGUF, safetensors) is corrupt or unsupported."""


class TokenizerError(JaxinferError, ValueError):
    """A tokenizer file is missing, corrupt or of an unknown kind."""


class BadRequestError(JaxinferError, ValueError):
    """A generation request has out-of-range parameters (prompt, lengths, sampling).

    `param` names the request field at fault ("top_p", "stop_token_ids", ...) when one
    is: the server reports it as the error body's `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelFetchError(JaxinferError, RuntimeError):
    """The default model could not be fetched (e.g. no network)."""


class DistributedError(JaxinferError, RuntimeError):
    """A multi-process run could not start (coordinator unreachable, peer missing)."""
