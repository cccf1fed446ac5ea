"""Kernel tests: on the Triton CPU interpreter without a GPU, compiled on the GPU when CUDA is present.

``TRITON_INTERPRET`` is read by triton when it is imported (``@triton.jit`` then builds interpreter objects),
so tests/conftest.py sets it before any test module imports triton or the kernels. Without triton the whole directory
is skipped (each test module calls ``pytest.importorskip("triton")``).
"""

from __future__ import annotations


import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


ON_GPU = _cuda_available()
# TRITON_INTERPRET=1 is set by tests/conftest.py, before any test module can import triton.


@pytest.fixture(autouse=True)
def _usable_triton():
    """Skip (each module also skips itself without triton) when the interpreter cannot be switched on anymore.

    A skip raised while pytest loads a conftest is an error, not a skip, so the checks live in this fixture.
    """
    triton = pytest.importorskip("triton")
    if not ON_GPU and not triton.knobs.runtime.interpret:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set and there is no GPU; run "
                    "tests/kernels in its own pytest process")


@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernels run: ``cuda`` on a GPU machine, else ``cpu`` (interpreter)."""
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="session")
def ptx_cache(tmp_path_factory):
    """One PTX cache for the session, so tests that compile the same kernel share the work."""
    return tmp_path_factory.mktemp("ptx-cache")
