"""Shared fixtures: offline mode, and the tiny presets built once per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llava():
    """The ``tiny-llava`` preset as a :class:`LoadedModel` (shared; tests must not mutate it)."""
    from edgeprune.models.loader import load_model

    return load_model("tiny-llava")


@pytest.fixture(scope="session")
def tiny_llava_next():
    """The ``tiny-llava-next`` preset as a :class:`LoadedModel` (shared; tests must not mutate it)."""
    from edgeprune.models.loader import load_model

    return load_model("tiny-llava-next")


@pytest.fixture(scope="session")
def rgb_image():
    """A deterministic random 400x300 RGB image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per
    process thrash (measured 4x slower under load); restore the setting at the end."""
    try:
        import torch
    except ImportError:  # torch-free test environments
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
