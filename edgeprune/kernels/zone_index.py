"""The zone index ``ZonalTopK``'s kernel reads: zone sizes and the stable zone-sorted token order, on the device.

``zonal_topk_kernel`` takes ``order = argsort(zone, stable=True)`` and ``sizes = bincount(zone, minlength=Z)``
next to the zone ids. The torch wrapper computes them with torch; a TensorRT plugin only has the zone ids, so
``zone_index_kernel`` computes both from them in one launch, without atomics or a sort:

* ``sizes[z] = #{j : zone_j == z}``;
* the sorted position of token i is its rank under (zone ascending, index ascending),
  ``pos_i = #{j : zone_j < zone_i or (zone_j == zone_i and j < i)}``, and ``order[pos_i] = i``.

Both are exact integer counts, so the result equals torch's stable argsort and bincount for any input.

Launch contract (TensorRT AOT order: inputs, int32 scalars, outputs):

====  =====  ==========  ============================================
 #    name   dtype       meaning
====  =====  ==========  ============================================
 0    zone   *i32 [N]    zone ids in [0, Z)
 1    N      i32         tokens
 2    Z      i32         zone slots
 3    order  *i32 [N]    token indices sorted stably by zone
 4    sizes  *i32 [Z]    tokens per zone
====  =====  ==========  ============================================

Grid ``(cdiv(max(N, Z), BLOCK_M), 1, 1)``: program p ranks tokens ``[p BLOCK_M, (p+1) BLOCK_M)`` and counts
zones of the same range; 4 warps. Work O((N + Z) N), a few microseconds for N = 2,880.
"""

from __future__ import annotations

from .._deps import require

triton = require("triton")
tl = triton.language


@triton.jit
def zone_index_kernel(zone_ptr, N, Z, order_ptr, sizes_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Ranks of one tile of tokens under (zone, index) and the sizes of one tile of zones (see module doc)."""
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_i = i < N
    zi = tl.load(zone_ptr + i, mask=ok_i, other=0)
    offs = tl.arange(0, BLOCK_N)
    pos = tl.zeros([BLOCK_M], tl.int32)
    count = tl.zeros([BLOCK_M], tl.int32)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + offs
        ok_j = j < N
        zj = tl.load(zone_ptr + j, mask=ok_j, other=0)
        first = (zj[None, :] < zi[:, None]) | ((zj[None, :] == zi[:, None]) & (j[None, :] < i[:, None]))
        pos += tl.sum((first & ok_j[None, :]).to(tl.int32), 1)
        count += tl.sum(((zj[None, :] == i[:, None]) & ok_j[None, :]).to(tl.int32), 1)  # i read as a zone id
    tl.store(order_ptr + pos, i, mask=ok_i)
    tl.store(sizes_ptr + i, count, mask=i < Z)


GPU_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 256}
INTERPRETER_BLOCKS = {"BLOCK_M": 1024, "BLOCK_N": 1024}
NUM_WARPS = 4


def zone_index(zone, num_zones: int):
    """``(argsort(zone, stable=True), bincount(zone, minlength=Z))`` as int32, with the kernel.

    Args:
        zone: [N] int zone ids in ``[0, num_zones)`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        num_zones: Z.
    Returns:
        (order [N] int32, sizes [Z] int32).
    Raises:
        BackendError: CPU tensors without the interpreter.
    """
    import torch

    from .zonal_topk import check_device, is_interpreted

    check_device(zone, "zone_index")
    n = zone.shape[0]
    order = torch.empty(n, dtype=torch.int32, device=zone.device)
    sizes = torch.empty(num_zones, dtype=torch.int32, device=zone.device)
    blocks = INTERPRETER_BLOCKS if is_interpreted() else GPU_BLOCKS
    grid = (triton.cdiv(max(n, num_zones), blocks["BLOCK_M"]),)
    zone_index_kernel[grid](zone.to(torch.int32).contiguous(), n, num_zones, order, sizes, **blocks,
                            num_warps=NUM_WARPS)
    return order, sizes
