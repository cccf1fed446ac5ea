"""Lazy imports of optional heavy dependencies with messages that name the extra to install.

``import edgeprune`` and ``edgeprune --help`` need numpy only (house rule 4); every module that needs
torch, transformers, onnxruntime or tensorrt calls :func:`require` at the point of use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# module name -> (extra, install hint)
_EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("export", "pip install torch==2.13.0 (the CPU wheel) first, then pip install -e '.[export]'"),
    "transformers": ("export", "pip install -e '.[export]'"),
    "tokenizers": ("ort", "pip install -e '.[ort]'"),
    "onnx": ("export", "pip install -e '.[export]'"),
    "jsonschema": ("ort", "pip install -e '.[ort]' (every bundle reader validates the manifest with it)"),
    "onnxruntime": ("ort", "pip install -e '.[ort]' (or '.[gpu]' for CUDA)"),
    "tensorrt": ("trt", "pip install -e '.[trt]' (on Jetson use the JetPack tensorrt bindings)"),
    "triton": ("kernels", "pip install -e '.[kernels]'"),
    "matplotlib": ("viz", "pip install -e '.[viz]'"),
    "polygraphy": ("eval", "pip install -e '.[eval]'"),
    "tensorrt_rtx_bindings": ("", "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"),
    "cuda": ("trt", "pip install cuda-python"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that provides it.

    Args:
        module: importable module name, e.g. ``"torch"`` or ``"onnxruntime"``.
    Returns:
        The imported module.
    Raises:
        MissingDependencyError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra, hint = _EXTRAS.get(top, ("", f"pip install {top}"))
        what = f" (extra [{extra}])" if extra else ""
        raise MissingDependencyError(f"{module} is not installed{what}; install it with: {hint}") from exc


def package_versions(names: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """Installed distribution versions of ``names`` (None for one that is not installed); imports nothing."""
    import importlib.metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def available(module: str) -> bool:
    """Return True when ``module`` can be imported (used for capability checks and test skips)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
