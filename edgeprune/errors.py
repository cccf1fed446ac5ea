"""Typed errors for user-facing mistakes.

Every error says what went wrong, what was expected versus what was got, and what to do. The CLI prints
``error: <message>`` on one line and exits with code 2 for any :class:`EdgepruneError`; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class EdgepruneError(Exception):
    """Base class of every user-facing error (CLI exit code 2)."""

    exit_code = 2


class MissingDependencyError(EdgepruneError):
    """An optional dependency is not installed; the message names the extra to install."""


class UnknownNameError(EdgepruneError):
    """A key that is looked up in a registry is unknown; the message lists the known keys."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...], hint: str = "") -> None:
        self.kind, self.name, self.known = kind, name, list(known)
        msg = f"unknown {kind} {name!r}; known: {', '.join(self.known)}"
        super().__init__(msg + (f". {hint}" if hint else ""))


class UnknownModelError(UnknownNameError):
    """``--model`` is neither a preset, a local directory, nor a Hugging Face id."""


class UnknownMethodError(UnknownNameError):
    """``--method`` is not a registered pruning method."""


class MethodArgumentError(EdgepruneError):
    """A ``--method-arg`` is malformed, unknown for the method, or has a bad value."""


class BudgetError(EdgepruneError):
    """The token budget is invalid: K <= 0, K > N, or a ratio outside (0, 1]."""


class ImageError(EdgepruneError):
    """The image is missing, unreadable or corrupt."""


class PromptError(EdgepruneError):
    """The prompt cannot be used, e.g. it leaves no room for the image tokens in the context."""


class ModelLoadError(EdgepruneError):
    """A model directory or id cannot be loaded (not a LLaVA checkpoint, broken config, offline)."""


class BackendError(EdgepruneError):
    """A runtime backend is unknown, unavailable, or was given inputs that do not match its graph spec."""


class ExportError(EdgepruneError):
    """An export cannot be done as asked (unsupported method/model/opset, existing output, failed validation)."""


class BundleError(ModelLoadError):
    """A bundle is missing, incomplete, corrupt, unsafe, or from an unknown format version (CLI exit code 2)."""


class NonFiniteError(BackendError):
    """A model produced NaN or infinite values where a method needs finite ones (e.g. fp16 overflow)."""
