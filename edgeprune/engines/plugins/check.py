"""Run the plugins' launch path on torch tensors and compare it with the PyTorch reference (GPU test, benchmark).

:func:`make_case` builds the inputs a plugin node receives (LLaVA-1.5: N = 576 in 24 x 24 patches; NeXT sizes:
N = 2,880 in five views), :func:`run_case` allocates the outputs and the workspace and calls
:meth:`.launch.PluginLauncher.run` with their ``data_ptr()`` values and a stream handle, exactly as TensorRT's
``enqueue`` would, and :func:`reference_indices` gives :mod:`edgeprune.methods`' answer. With a
:class:`.launch.RecordingDriver` and CPU tensors, :func:`run_case` checks everything but the driver calls.
Needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..._deps import require
from .contract import OUTPUTS, problem_dims, resolve_shape, output_dims, workspace_bytes

TORCH_DTYPES = {"float32": "float32", "int32": "int32", "int64": "int64"}


@dataclass
class Case:
    """One plugin call: op, attributes, input tensors (node order) and whether exact indices are required."""

    op: str
    attrs: dict
    inputs: list
    exact: bool = True  # GraphRank: False when the input has a near-tie (see kernels/graph_rank.py)


def _zones(n: int, views: int, grid: int, g: int) -> Any:
    """Zone ids of ``views`` square ``grid x grid`` views cut into ``g x g`` zones (as gridprune_fn.zone_ids)."""
    torch = require("torch")
    per = grid * grid
    i = torch.arange(n)
    view, pos = i // per, i % per
    row, col = pos // grid, pos % grid
    return (view * g * g + (row * g // grid) * g + (col * g // grid)).to(torch.int32)


def make_case(op: str, n: int, k: int, *, batch: int = 1, d: int = 1024, seed: int = 0, device: str = "cpu") -> Case:
    """Inputs of a plugin node with N tokens (N a multiple of 576: views of 24 x 24 patches) and budget K.

    ZonalTopK: uniform scores and per-token relevance like CLIP cosines, G = 4 zones per side. GraphRank:
    clustered features (cosines far from theta, as the kernel tests use), D features, one group.
    """
    torch = require("torch")
    gen = torch.Generator().manual_seed(seed)
    if op == "ZonalTopK":
        views = max(1, n // 576)
        zone = _zones(n, views, 24, 4)
        attrs = {"K": k, "tau": 0.05, "zones": 4, "num_zones": views * 16}
        inputs = [torch.rand(batch, n, generator=gen), 0.1 + 0.25 * torch.rand(batch, n, generator=gen), zone]
        return Case(op, attrs, [t.to(device) for t in inputs])
    n_centres = min(d, max(2, n // 40))
    q = torch.linalg.qr(torch.randn(batch, d, n_centres, generator=gen)).Q.transpose(1, 2)  # orthonormal centres
    label = torch.randint(0, n_centres, (batch, n), generator=gen)
    x = q.gather(1, label.unsqueeze(-1).expand(-1, -1, d)) + 0.08 * torch.randn(batch, n, d, generator=gen)
    x = x * (0.5 + torch.rand(batch, n, 1, generator=gen))
    attrs = {"K": k, "threshold": 0.5, "temperature": 0.03, "steps": 5, "num_groups": 1}
    return Case(op, attrs, [x.to(device), torch.zeros(n, dtype=torch.int32, device=device)],
                exact=_clear_margins(x, k, attrs))


def _clear_margins(x: Any, k: int, attrs: dict) -> bool:
    """No cosine within 1e-5 of theta and a K-th score gap above fp32 rounding: exact indices required."""
    torch = require("torch")
    from ...methods.gprune_fn import gprune_scores

    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    if float((xn @ xn.transpose(1, 2) - attrs["threshold"]).abs().min()) < 1e-5:
        return False
    if k == x.shape[1]:
        return True
    top = torch.sort(gprune_scores(x, attrs["threshold"], attrs["temperature"], attrs["steps"]), dim=-1,
                     descending=True).values
    return bool(((top[:, k - 1] - top[:, k]) > 1e-4 * top[:, k - 1].abs() + 1e-6).all())


def reference_indices(case: Case) -> Any:
    """[B, K] int32 kept indices from :mod:`edgeprune.methods` (CPU)."""
    torch = require("torch")
    a = case.attrs
    if case.op == "ZonalTopK":
        from ...methods import gridprune_fn as G

        scores, rel, zone = (t.cpu() for t in case.inputs)
        z = zone.long()
        quotas = G.allocate_quotas(G.zone_mean(rel, z, a["num_zones"]), G.zone_sizes(z, a["num_zones"]), a["K"],
                                   a["tau"])
        return G.zonal_topk(scores, z, quotas, a["K"]).to(torch.int32)
    from ...methods.gprune_fn import gprune_select

    x, group = (t.cpu() for t in case.inputs)
    return gprune_select(x, group.long(), a["K"], a["threshold"], a["temperature"], a["steps"]).to(torch.int32)


def allocate(case: Case) -> tuple[list, Any]:
    """Output tensors (node order) and a uint8 workspace tensor of :func:`.contract.workspace_bytes` bytes."""
    torch = require("torch")
    device = case.inputs[0].device
    shapes = [tuple(t.shape) for t in case.inputs]
    outputs = [torch.empty(resolve_shape(dims, shapes), dtype=getattr(torch, TORCH_DTYPES[spec.dtype]), device=device)
               for dims, spec in zip(output_dims(case.op, case.attrs), OUTPUTS[case.op])]
    nbytes = workspace_bytes(case.op, problem_dims(case.op, case.attrs, shapes))
    return outputs, torch.empty(nbytes, dtype=torch.uint8, device=device)


def run_case(case: Case, launcher: Any, stream: int, buffers: tuple[list, Any] | None = None) -> tuple[list, Any]:
    """Queue one plugin call through ``launcher`` (a :class:`.launch.PluginLauncher`) on ``stream``.

    Returns:
        (outputs, workspace): the tensors the launches write (read them after synchronising the stream).
    """
    outputs, ws = buffers if buffers is not None else allocate(case)
    launcher.run([tuple(t.shape) for t in case.inputs], [t.data_ptr() for t in case.inputs],
                 [t.data_ptr() for t in outputs], ws.data_ptr(), stream, workspace_bytes=ws.numel())
    return outputs, ws


def scores_close(case: Case, ws: Any, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """GraphRank: the scores the launch path left in the workspace's ``score`` slot are within fp32 tolerance of
    :func:`~edgeprune.methods.gprune_fn.gprune_scores` (what decides a near-tie's verdict)."""
    torch = require("torch")
    from ...methods.gprune_fn import gprune_scores
    from .contract import workspace_layout

    x = case.inputs[0]
    off, nbytes = workspace_layout(case.op, problem_dims(case.op, case.attrs, [tuple(t.shape) for t in case.inputs])
                                   ).slots["score"]
    got = ws[off:off + nbytes].view(torch.float32).view(tuple(x.shape[:2])).cpu()
    a = case.attrs
    ref = gprune_scores(x.cpu(), a["threshold"], a["temperature"], a["steps"])
    return bool(torch.allclose(got, ref, rtol=rtol, atol=atol))
