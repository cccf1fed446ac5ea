"""The explicit registry of pruning methods (house rule 5): name -> class.

An unknown name raises :class:`UnknownMethodError` listing the registered names.
"""

from __future__ import annotations

from typing import Mapping

from ..errors import UnknownMethodError
from .base import PruningMethod
from .baselines import ClsTopK, NoPrune, RandomPrune, UniformPrune
from .fastv import FastV
from .fitprune import FitPrune
from .gprune import GPrune
from .gridprune import GridPrune

METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (NoPrune, RandomPrune, UniformPrune, ClsTopK, GridPrune, GPrune, FitPrune, FastV)
}


def get_method_class(name: str) -> type[PruningMethod]:
    """Return the class registered under ``name``.

    Raises:
        UnknownMethodError: lists the known names.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError("method", name, sorted(METHODS), hint="run `edgeprune methods` for details") from None


def build_method(name: str, args: Mapping[str, str] | None = None) -> PruningMethod:
    """Instantiate the method ``name`` from ``--method-arg`` strings."""
    return get_method_class(name).from_args(args)
