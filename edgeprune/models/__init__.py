"""Model presets, offline builders and family adapters (the only code that knows HF attribute paths).

Only the registry is imported eagerly; families and loaders import torch and are imported on use.
"""

from .registry import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "get_preset"]
