"""Graph boundaries as data (DESIGN.md §4 ``GraphSpec``, house rule 6), part of the bundle format.

One :class:`GraphSpec` per exported graph names its inputs and outputs, their dtypes and their dimensions,
each either a fixed size or a symbolic name (``"batch"``, ``"seq"``, ``"past"``, ...). The same object drives
the exporter (``torch.export`` dynamic shapes, example inputs), is stored in the bundle manifest, and checks the
feeds of the runtime runners (ONNX Runtime today, TensorRT optimisation profiles later).

This module imports numpy only: the runtime reads specs back from a manifest without torch. The spec builders of
each graph and the torch-facing :func:`edgeprune.export.spec.dynamic_shapes` live in :mod:`edgeprune.export.spec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import BackendError

Dim = int | str  # a fixed size or a symbolic name

# Spec dtype name -> numpy dtype. Names are ONNX/numpy style and are what the manifest stores.
DTYPES: dict[str, Any] = {
    "float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: the ONNX value name.
        dtype: a key of :data:`DTYPES` (``float32``, ``float16``, ``int64``, ``int32``, ``bool``).
        dims: one entry per axis, an int (fixed) or a str (a symbolic dimension shared across the graph).
    """

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        object.__setattr__(self, "dims", tuple(d if isinstance(d, str) else int(d) for d in self.dims))

    @property
    def np_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for the symbolic sizes in ``sizes`` (fixed dims are kept)."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), dims=tuple(d["dims"]))


@dataclass(frozen=True)
class GraphSpec:
    """The boundary of one exported graph.

    Attributes:
        name: graph name (``vision``, ``prune``, ``embed``, ``decoder``); also the ONNX file stem.
        inputs: input tensors, in the order of the wrapper's ``forward`` arguments.
        outputs: output tensors, in the order the wrapper returns them.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def symbols(self) -> list[str]:
        """Every symbolic dimension name used by the inputs, in first-use order."""
        seen: list[str] = []
        for t in self.inputs:
            seen += [d for d in t.dims if isinstance(d, str) and d not in seen]
        return seen

    def dummy_inputs(self, sizes: Mapping[str, int], seed: int = 0,
                     overrides: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Example feeds: standard-normal floats, zero integers, unless given in ``overrides``.

        Args:
            sizes: a size for every symbol (use sizes >= 2: ``torch.export`` specialises 0 and 1).
            seed: seed of the private generator.
            overrides: arrays used as given for some inputs (token ids, masks, positions).
        Returns:
            name -> array with the spec's dtype and shape.
        """
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            if overrides and t.name in overrides:
                out[t.name] = np.asarray(overrides[t.name], dtype=t.np_dtype)
            elif np.issubdtype(t.np_dtype, np.floating):
                out[t.name] = rng.standard_normal(t.shape(sizes)).astype(t.np_dtype)
            else:
                out[t.name] = np.zeros(t.shape(sizes), dtype=t.np_dtype)
        return out

    # ------------------------------------------------------------------ runtime side
    def check_inputs(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, Any]) -> dict[str, int]:
        """Check feeds against the spec: names, dtypes, ranks, fixed sizes and consistent symbolic sizes.

        Args:
            shapes: input name -> shape of the array about to be fed.
            dtypes: input name -> numpy dtype (or its name) of that array.
        Returns:
            The size bound to every symbol.
        Raises:
            BackendError: a missing or unexpected input, or a dtype/shape that does not match (says which).
        """
        missing = [n for n in self.input_names if n not in shapes]
        extra = sorted(set(shapes) - set(self.input_names))
        if missing or extra:
            raise BackendError(f"graph {self.name!r}: inputs do not match its spec (missing {missing}, "
                               f"unexpected {extra}); expected {self.input_names}")
        bound: dict[str, int] = {}
        for t in self.inputs:
            got_dtype = np.dtype(dtypes[t.name])
            if got_dtype != np.dtype(t.np_dtype):
                raise BackendError(f"graph {self.name!r}: input {t.name!r} expects {t.dtype}, got {got_dtype}")
            shape = tuple(shapes[t.name])
            if len(shape) != len(t.dims):
                raise BackendError(f"graph {self.name!r}: input {t.name!r} expects rank {len(t.dims)} "
                                   f"{list(t.dims)}, got shape {list(shape)}")
            for axis, (want, got) in enumerate(zip(t.dims, shape)):
                if isinstance(want, int) and want != got:
                    raise BackendError(f"graph {self.name!r}: input {t.name!r} axis {axis} must be {want}, "
                                       f"got {got} (shape {list(shape)}; spec {list(t.dims)})")
                if isinstance(want, str) and bound.setdefault(want, got) != got:
                    raise BackendError(f"graph {self.name!r}: dimension {want!r} is {bound[want]} elsewhere but "
                                       f"{got} in input {t.name!r}")
        return bound

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """:meth:`check_inputs` for numpy feeds."""
        return self.check_inputs({k: v.shape for k, v in feeds.items()}, {k: v.dtype for k, v in feeds.items()})

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GraphSpec":
        return cls(name=str(d["name"]), inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]))
