"""Shared fixtures: offline mode, the tiny presets built once per test session, and the session's exported
bundles (:func:`exported_bundle`: one export per model x method x K x arguments, reused by every test module)."""

from __future__ import annotations

import os
from pathlib import Path

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


# The FitPrune recipe the session's in-LLM bundles use (4-layer tiny models, fitted at N = 576).
TINY_RECIPE_DROPS = (100, 200, 0, 50)


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory) -> Path:
    """A FitPrune recipe file for the tiny presets, shared by every test (so their bundles are shared too)."""
    from edgeprune.methods.fitprune_recipe import Recipe, save_recipe

    path = tmp_path_factory.getbasetemp() / "tiny-recipe.json"
    if not path.is_file():
        save_recipe(Recipe(budget=0.5, n_visual=576, num_layers=4, drops=TINY_RECIPE_DROPS), path)
    return path


def bundle_name(model: str, method: str, tokens, method_args=None, **export_kwargs) -> str:
    """``{model}-{method}-{K}[-arg=value...][-kwarg=value...]``; a recipe is named by its file stem."""
    args = {k: (Path(v).stem if k == "recipe" else v) for k, v in sorted((method_args or {}).items())}
    extra = "".join(f"-{k}={v}" for k, v in args.items())
    extra += "".join(f"-{k}={v}" for k, v in sorted(export_kwargs.items()))
    return f"{model}-{method}-{tokens}{extra}"


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory):
    """Factory ``exported_bundle(loaded, method, tokens=None, method_args=None, **export_kwargs) -> Path``.

    Each distinct bundle is exported once per session under ``<basetemp>/bundles/`` and shared by every module
    (tests must not modify it: copy it first). Every export after a model's first reuses that model's
    ``cls-topk`` K=64 graphs (vision, embed, decoder) where the export arguments allow, so a method costs only its
    own graphs. An atomic export leaves a directory only when it is complete.
    """
    from edgeprune.bundle.format import MANIFEST
    from edgeprune.export.exporter import export_bundle

    base = tmp_path_factory.getbasetemp() / "bundles"

    def get(loaded, method: str, tokens=None, method_args=None, reuse: bool = True, **export_kwargs) -> Path:
        root = base / bundle_name(loaded.name, method, tokens, method_args, **export_kwargs)
        if (root / MANIFEST).is_file():
            return root
        source = None
        if reuse and export_kwargs.get("dtype", "fp32") == "fp32" and "opset" not in export_kwargs \
                and "weights" not in export_kwargs and (method, tokens, method_args) != ("cls-topk", 64, None):
            source = get(loaded, "cls-topk", 64)
        export_bundle(loaded, method, tokens=tokens, method_args=method_args, out_dir=root, reuse_from=source,
                      log=lambda msg: None, **export_kwargs)
        return root

    return get
