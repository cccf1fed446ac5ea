"""Shared fixtures: offline mode, the tiny presets built once per test session, and the session's exported
bundles (:func:`exported_bundle`: one export per model x method x K x arguments, reused by every test module)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # torch-free test environments
        return False
    return torch.cuda.is_available()


# Triton reads TRITON_INTERPRET once, when it is first imported, and test modules all over the tree import it
# during collection (PTX contract checks, kernel-backed methods): so the interpreter is switched on here, the
# first conftest pytest loads, or tests/kernels would find a compiled-mode triton on a CPU-only machine and skip.
if "triton" not in sys.modules and not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"


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


# The K of each model's base bundle (cls-topk, exported in full; the others reuse its graphs).
BASE_K = {"tiny-llava-next": 160}


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory, tiny_recipe):
    """Factory ``exported_bundle(loaded, method, tokens=None, method_args=None, **export_kwargs) -> Path``.

    Each distinct bundle is exported once per session under ``<basetemp>/bundles/`` and shared by every module
    (tests must not modify it: copy it first). Every other bundle reuses the model graphs (vision, embed, decoder)
    of the model's ``cls-topk`` bundle (K = 64, NeXT 160; FitPrune: FastV's ragged decoder) unless its export
    arguments change them (dtype, opset, weights, ort_variant), so a method costs only its own graphs. An atomic
    export leaves a directory only when it is complete.
    """
    from edgeprune.bundle.format import MANIFEST
    from edgeprune.export.exporter import export_bundle

    base = tmp_path_factory.getbasetemp() / "bundles"

    def get(loaded, method: str, tokens=None, method_args=None, reuse: bool | Path = True, **export_kwargs) -> Path:
        """``reuse``: True (the model's base bundle, see above), False, or the bundle to reuse (e.g. FastV's ragged
        decoder for FitPrune)."""
        method_args = dict(method_args or {}) or None
        root = base / bundle_name(loaded.name, method, tokens, method_args, **export_kwargs)
        if (root / MANIFEST).is_file():
            return root
        k = BASE_K.get(loaded.name, 64)
        source = reuse if isinstance(reuse, Path) else None
        if reuse is True and root != base / bundle_name(loaded.name, "cls-topk", k) \
                and not {"dtype", "opset", "weights", "ort_variant"} & set(export_kwargs):
            # FitPrune's ragged decoder has FastV's spec: reuse it; every other method reuses cls-topk's graphs
            source = get(loaded, "fastv", k) if method == "fitprune" else get(loaded, "cls-topk", k)
        export_bundle(loaded, method, tokens=tokens, method_args=method_args, out_dir=root, reuse_from=source,
                      log=lambda msg: None, **export_kwargs)
        return root

    get.recipe = tiny_recipe  # the session's FitPrune recipe file
    return get
