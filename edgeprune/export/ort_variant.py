"""The LLM decoder's attention lowering per consumer, and the fused-attention decoder ONNX Runtime prefers.

Attention dominates a decoder's prefill at LLaVA's sequence lengths (~640 tokens), and how it is lowered decides
its speed:

- **Below opset 23** the dynamo exporter decomposes ``scaled_dot_product_attention`` into MatMul / mask Add /
  Softmax / MatMul *plus a NaN guard* (``Where(IsNaN(p), 0, p)`` over every ``[B,H,S,T]`` probability tensor, for
  rows with no key left). A causal decoder never has such a row, yet the guard is two more full passes per layer:
  about a third of ONNX Runtime's prefill time on tiny-llava. HF's *eager* attention (``softmax(q kᵀ · s + mask)``,
  float32 softmax, finite mask) exports to the plain pattern, which TensorRT's attention fusion also matches, so
  the portable graph is traced with it (:func:`llm_attention`). The PyTorch reference it is validated against
  keeps the model's own (SDPA) attention, so the swap is checked numerically on every export.
- **At opset 23** SDPA becomes the fused ``Attention`` op (with ``RotaryEmbedding`` and ``RMSNormalization``),
  which ONNX Runtime runs in one kernel per layer: prefill 1.1-1.3x faster on CPU than the plain pattern. But
  TensorRT 10.x (JetPack 6) and older ONNX Runtime builds do not run that op.

So a bundle exported at opset 18 carries both for every LLM graph (``decoder``; FastV / FitPrune's ``prefill``
too, whose hand-written layer loop takes the same choice through :func:`edgeprune.methods.inllm.attend`):
``decoder.onnx`` (opset 18, portable: TensorRT, any ONNX consumer) and ``decoder.ort.onnx`` (the same module
exported at opset 23, validated the same way), which ONNX Runtime picks where it can (see
:func:`~edgeprune.runtime.ort_backend.choose_graph_file`). The variant stores no weights of its own: every
external tensor it has is byte-identical to one in ``decoder.onnx.data`` (checked, :func:`share_external_data`),
so it points there and costs only its graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

from .._deps import require
from ..bundle.format import VARIANT_OPSET


@contextlib.contextmanager
def llm_attention(llm: Any, opset: int) -> Iterator[None]:
    """Trace ``llm`` (an HF ``PreTrainedModel`` decoder stack) with eager attention below opset 23, then restore.

    Uses the public ``set_attn_implementation`` (no patching); the model's implementation is restored even when
    the export fails, so the PyTorch reference the graph is validated against still runs the model's own
    attention. Does nothing for ``llm=None`` or opset >= 23 (SDPA lowers to the fused Attention op there).
    """
    if llm is None or opset >= VARIANT_OPSET:
        yield
        return
    before = llm.config._attn_implementation
    llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        llm.set_attn_implementation(before)


def _external_tensors(proto: Any) -> Iterator[tuple[Any, dict[str, str]]]:
    onnx = require("onnx")
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor, {e.key: e.value for e in tensor.external_data}


def _read(root: Path, info: dict[str, str]) -> bytes:
    with open(root / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]))


def share_external_data(variant: Path, base: Path) -> list[str]:
    """Point the external tensors of ``variant`` at byte-identical tensors in ``base``'s sidecar.

    Both graphs live in the same directory. Tensors are matched by content (sha256 of their bytes, dtype and
    shape), not by name: the exporter names constant-folded weights (``val_23`` = a transposed ``q_proj``)
    differently per opset. A tensor without a twin stays in the variant's own sidecar, which is rewritten to
    hold only those; when every tensor has a twin the variant's sidecar is deleted.

    Returns:
        The files the variant needs besides itself, sorted (sidecar names relative to the directory).
    """
    onnx = require("onnx")
    root = variant.parent
    base_proto = onnx.load(str(base), load_external_data=False)
    twins: dict[tuple[str, int, tuple[int, ...]], dict[str, str]] = {}
    for tensor, info in _external_tensors(base_proto):
        key = (hashlib.sha256(_read(root, info)).hexdigest(), tensor.data_type, tuple(tensor.dims))
        twins.setdefault(key, info)
    proto = onnx.load(str(variant), load_external_data=False)
    own_files = {info["location"] for _, info in _external_tensors(proto)}
    leftovers: list[tuple[Any, bytes]] = []
    for tensor, info in _external_tensors(proto):
        data = _read(root, info)
        twin = twins.get((hashlib.sha256(data).hexdigest(), tensor.data_type, tuple(tensor.dims)))
        if twin is None:
            leftovers.append((tensor, data))
        else:
            _set_external(tensor, twin["location"], int(twin.get("offset", 0)), int(twin["length"]))
    sidecar = f"{variant.name}.data"
    if leftovers:  # rewrite a sidecar holding only the tensors without a twin
        tmp = root / f".{sidecar}.tmp"
        with open(tmp, "wb") as f:
            for tensor, data in leftovers:
                _set_external(tensor, sidecar, f.tell(), len(data))
                f.write(data)
    for name in own_files:
        os.remove(root / name)
    if leftovers:
        os.rename(root / f".{sidecar}.tmp", root / sidecar)
    onnx.save(proto, str(variant))
    return sorted({info["location"] for _, info in _external_tensors(proto)})


def _set_external(tensor: Any, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
