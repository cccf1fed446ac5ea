"""``--kernels triton``: GridPrune and G-Prune run their fused kernels (interpreter here) with the reference's indices."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from edgeprune.api import build_pipeline  # noqa: E402
from edgeprune.methods import build_method  # noqa: E402


@pytest.mark.parametrize("method,k", [("gridprune", 64), ("gprune", 64)])
def test_pipeline_kernels_match_the_reference(method, k, tiny_llava, rgb_image):
    kept = {}
    for kernels in ("torch", "triton"):
        pipe = build_pipeline("", method, tokens=k, loaded=tiny_llava, kernels=kernels)
        result = pipe.run(rgb_image, "What does the sign say?", max_new_tokens=1)
        assert result.profile.counters["kernels"] == kernels
        kept[kernels] = result.kept.tolist()
    assert kept["torch"] == kept["triton"]


def test_methods_without_a_fused_kernel_keep_torch():
    m = build_method("cls-topk")
    assert m.use_kernels("triton") == "torch"
    assert build_method("gridprune").use_kernels("triton") == "triton"
