"""The ``trt`` backend on a test double of the TensorRT + CUDA surface (``trt_double.py``): real TensorRT-RTX
plans built on this CPU, deserialized by the double into engines that run the bundle's ONNX graphs with
onnxruntime on host memory. A whole pipeline through :class:`TrtBackend` must give the ORT backend's tokens,
kept indices and in-LLM cache lengths exactly (GridPrune with its prune and guidance engines; FastV over the
ragged cache), keep the KV cache on the "device" (no cache bytes cross to the host per decode step), switch the
decoder from its prefill to its decode profile, and report CUDA-event stage timings. Where no usable TensorRT
exists (here: TensorRT-RTX without a CUDA driver) ``--backend trt`` is one clear error.

Tests marked ``trt`` run unchanged wherever ``import tensorrt`` and a GPU work: build + run end to end, and
``compare --backends ort,trt``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgeprune.bundle import open_bundle
from edgeprune.errors import BackendError, EdgepruneError
from edgeprune.runtime.ort_backend import build_ort_pipeline
from edgeprune.runtime.preprocess import default_image
from edgeprune.runtime.trt_backend import TrtBackend, build_trt_pipeline, load_api

from trt_double import fake_api

PROMPT = "What does the sign say?"
NEW = 6


@pytest.fixture(scope="module")
def engines(tmp_path_factory, exported_bundle, tiny_llava):
    """method -> (bundle copy with a TensorRT-RTX engine set built at opt level 0, its key)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from edgeprune.engines.build import BuildRequest, build_bundle

    cache = {}

    def get(method):
        if method not in cache:
            root = tmp_path_factory.mktemp(f"trt-{method}") / "bundle"
            shutil.copytree(exported_bundle(tiny_llava, method, 64), root)
            rec = build_bundle(BuildRequest(bundle=root, opt_level=0), log_line=lambda m: None,
                               device_cc=lambda: None)
            cache[method] = root, rec["dir"].split("/")[1]
        return cache[method]

    return get


def _run(pipe):
    return pipe.run(default_image(), PROMPT, max_new_tokens=NEW)


def _pipeline(be):
    """The pipeline ``build_trt_pipeline`` would make, around an existing backend."""
    from edgeprune.methods.base import Budget
    from edgeprune.runtime.pipeline import Pipeline

    m = be.bundle.method
    return Pipeline(be, Budget(tokens=m["k"]) if m["uses_budget"] else Budget(), m["positions"],
                    bool(m["uses_budget"]), m["placement"])


@pytest.mark.parametrize("method", ["gridprune", "fastv"])
def test_pipeline_on_the_double_matches_ort(engines, method):
    root, key = engines(method)
    api = fake_api(open_bundle(root), key)
    got = _run(build_trt_pipeline(root, api=api))
    ref = _run(build_ort_pipeline(root, decoder="portable"))  # the ONNX files the engines were built from
    assert got.tokens == ref.tokens and len(got.tokens) == NEW
    assert np.array_equal(got.kept, ref.kept) and np.array_equal(got.kept_positions, ref.kept_positions)
    for k in ("layer_tokens", "cache_lengths", "visual_kept", "prompt_tokens"):
        assert got.profile.counters.get(k) == ref.profile.counters.get(k), k
    c = got.profile.counters
    assert c["backend"] == "trt" and c["engines"] == key
    assert {"gpu_ms_vision", "gpu_ms_prefill", "gpu_ms_decode"} <= set(c) and c["gpu_ms_decode"] >= 0
    if method == "gridprune":
        assert "gpu_ms_prune" in c and "gpu_ms_guidance" in c and c["plugins"] == "ZonalTopK:ipluginv3"
        assert api.register_plugins is not None


def test_kv_cache_stays_on_device_and_profiles_switch(engines):
    root, key = engines("gridprune")
    bundle = open_bundle(root)
    api = fake_api(bundle, key)
    be = TrtBackend(bundle, api=api, verify=False)
    _run(_pipeline(be))
    dec = api.trt.engines["decoder"]
    runs = [h for h in dec.history if h[0] == "run"]
    assert runs[0][1] == 0 and runs[0][2]["past_key_0"][2] == 0  # prefill: profile 0, empty past
    assert ("profile", 1) in dec.history and all(r[1] == 1 for r in runs[1:])  # then decode on profile 1
    lengths = [r[2]["past_key_0"][2] for r in runs[1:]]
    assert lengths == list(range(lengths[0], lengths[0] + NEW - 1))  # the cache grows one position per step
    # One more decode step: only the logits come back, only the token id / position / mask go up.
    vocab = bundle.manifest["model"]["vocab_size"]
    down, up, past = len(api.device.downloads), len(api.device.uploads), be.llm.cache.lengths[0]
    logits = be.decode(5, 200)
    assert logits.shape == (vocab,) and api.device.downloads[down:] == [4 * vocab]
    assert sorted(api.device.uploads[up:]) == [8, 8, 8 * (past + 1)]  # token id, position, attention mask
    assert be.llm.cache.lengths == [past + 1] * len(be.llm.cache.lengths)


def test_ragged_cache_lengths_follow_the_prefill(engines):
    root, key = engines("fastv")
    bundle = open_bundle(root)
    be = TrtBackend(bundle, api=fake_api(bundle, key), verify=False)
    result = _run(_pipeline(be))
    cache = be.llm.cache
    prefill_lengths = result.profile.counters["cache_lengths"]
    assert cache.lengths[::2] == [n + NEW - 1 for n in prefill_lengths] and cache.lengths[::2] == cache.lengths[1::2]
    assert len(set(prefill_lengths)) > 1  # ragged: FastV drops tokens after its layer
    assert be.runners["prefill"]._host_inputs == {"visual_start", "visual_count"}  # shape tensors, host-bound


def test_decoder_refuses_pre_llm_prefill_on_an_in_llm_bundle(engines):
    root, key = engines("fastv")
    bundle = open_bundle(root)
    be = TrtBackend(bundle, api=fake_api(bundle, key), verify=False)
    with pytest.raises(BackendError, match="in-LLM prefill only"):
        be.prefill(np.zeros((1, 3, 64), np.float32), np.arange(3))


def test_bundle_without_engines_refused(exported_bundle, tiny_llava):
    root = exported_bundle(tiny_llava, "gprune", 64)
    from edgeprune.runtime.trt_backend import TrtApi, select_engine_set

    api = TrtApi(trt=None, device=None, flavour="tensorrt", version="10.16.0", cc=90)
    with pytest.raises(BackendError, match="has no TensorRT engines; build them with `edgeprune build"):
        select_engine_set(open_bundle(root), api)


def test_no_usable_tensorrt_is_one_clear_error():
    from edgeprune.runtime.cuda_mem import device_compute_capability

    if device_compute_capability() is not None:
        pytest.skip("a CUDA device is visible here")
    with pytest.raises(EdgepruneError, match="not installed|needs cuda-python|no usable CUDA device") as info:
        load_api()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ real TensorRT (pytest -m trt)
@pytest.fixture
def real_trt():
    pytest.importorskip("tensorrt")
    from edgeprune.runtime.cuda_mem import device_compute_capability

    if device_compute_capability() is None:
        pytest.skip("no CUDA device")


@pytest.mark.trt
@pytest.mark.parametrize("method", ["gridprune", "fastv"])
def test_real_tensorrt_build_run_and_compare(real_trt, exported_bundle, tiny_llava, method, tmp_path):
    from edgeprune.cli import main
    from edgeprune.eval.compare import compare_bundle

    root = tmp_path / "bundle"
    shutil.copytree(exported_bundle(tiny_llava, method, 64), root)
    assert main(["build", "--bundle", str(root), "--flavour", "tensorrt", "--opt-level", "0"]) == 0
    got = _run(build_trt_pipeline(root))
    ref = _run(build_ort_pipeline(root, decoder="portable"))
    assert np.array_equal(got.kept, ref.kept)
    report = compare_bundle(root, "ort,trt", max_new_tokens=NEW, ort_decoder="portable")
    assert report.passed, report.table()


def test_cuda_device_over_a_recorded_runtime(monkeypatch):
    """CudaDevice's calls and status checks, on a stand-in for ``cuda.bindings.runtime`` (no driver here)."""
    import types

    from edgeprune.runtime import cuda_mem

    calls = []

    def ok(name, *values):
        return lambda *a: calls.append((name, a)) or (0, *values)

    attrs = types.SimpleNamespace(cudaDevAttrComputeCapabilityMajor="major", cudaDevAttrComputeCapabilityMinor="minor")
    rt = types.SimpleNamespace(
        cudaGetDeviceCount=ok("count", 1), cudaDeviceAttr=attrs,
        cudaDeviceGetAttribute=lambda attr, dev: (0, 8 if attr == "major" else 6),
        cudaSetDevice=ok("set"), cudaStreamCreate=ok("stream", 99), cudaMalloc=ok("malloc", 4096),
        cudaMemcpyAsync=ok("memcpy"), cudaStreamSynchronize=ok("sync"), cudaFree=ok("free"),
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                             cudaMemcpyDeviceToDevice=3))
    monkeypatch.setattr(cuda_mem, "_cudart", lambda: rt)
    assert cuda_mem.device_compute_capability() == 86
    dev = cuda_mem.CudaDevice()
    assert dev.cc == 86 and dev.stream_handle == 99
    buf = dev.alloc(64)
    dev.upload(buf, np.arange(4, dtype=np.int64))
    assert len(dev._pending) == 1 and calls[-1][1][2:4] == (32, 1)  # bytes, host to device
    out = dev.download(buf, (4,), np.int64)
    assert out.shape == (4,) and not dev._pending and calls[-1][0] == "sync"
    with pytest.raises(BackendError, match="do not fit a 64-byte buffer"):
        dev.upload(buf, np.zeros(100, np.float32))
    rt.cudaMalloc = lambda n: (2, None)  # cudaErrorMemoryAllocation
    with pytest.raises(BackendError, match="cudaMalloc failed"):
        dev.alloc(1 << 40)
    rt.cudaGetDeviceCount = lambda: (35, None)  # cudaErrorInsufficientDriver, as on this machine
    assert cuda_mem.device_compute_capability() is None
    with pytest.raises(BackendError, match="no usable CUDA device"):
        cuda_mem.CudaDevice()
