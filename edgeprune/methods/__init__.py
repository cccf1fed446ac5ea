"""Pruning methods: the interface (``base``), pure tensor functions (``functional``), and the registry."""

from .base import Budget, MethodParams, PruningMethod, TokenLayout, VisualTokens
from .registry import METHODS, build_method, get_method_class

__all__ = ["Budget", "METHODS", "MethodParams", "PruningMethod", "TokenLayout", "VisualTokens", "build_method",
           "get_method_class"]
