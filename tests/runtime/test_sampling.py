"""Decoding rules shared by every backend."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.errors import EdgepruneError
from edgeprune.runtime.sampling import Sampler, SamplingConfig


def test_greedy_ties_to_lower_id():
    assert Sampler()(np.array([0.1, 3.0, 3.0, -1.0])) == 1


def test_top_k_and_top_p_restrict_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    top1 = Sampler(SamplingConfig(do_sample=True, top_k=1, seed=0))
    assert {top1(logits) for _ in range(50)} == {0}
    nucleus = Sampler(SamplingConfig(do_sample=True, top_p=0.8, seed=0))
    assert {nucleus(logits) for _ in range(300)} == {0, 1}  # 0.5 + 0.3 reaches 0.8


def test_seed_reproducible():
    logits = np.random.default_rng(0).normal(size=100)
    a = Sampler(SamplingConfig(do_sample=True, seed=4))
    b = Sampler(SamplingConfig(do_sample=True, seed=4))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_config(bad):
    with pytest.raises(EdgepruneError):
        SamplingConfig(**bad)
