"""edgeprune: deploy multimodal LLMs with visual-token pruning on NVIDIA GPUs.

The package root imports nothing heavy: ``import edgeprune`` needs numpy only. Torch, transformers,
ONNX Runtime and TensorRT are imported lazily by the sub-packages that need them (see ``_deps``).
"""

__version__ = "0.1.0"

from .errors import EdgepruneError  # noqa: E402  (re-export; errors.py is dependency-free)

__all__ = ["EdgepruneError", "__version__"]
