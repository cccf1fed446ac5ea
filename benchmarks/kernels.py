"""Micro-benchmark of the fused Triton kernels against the PyTorch references, on a CUDA GPU.

    python benchmarks/kernels.py                      # N = 576 and 2,880, batch 1
    python benchmarks/kernels.py --sizes 576 --batch 4 --repeat 200

For each op and size it times (CUDA events around every call, after a warm-up; the median is reported):

* ``zonal_topk``: the reference ``allocate_quotas`` + ``gridprune_fn.zonal_topk`` vs the kernel launch alone
  (buffers prepared once, as a plugin does) and the torch-facing wrapper (which also sorts the zone ids);
* ``graph_rank``: ``stable_topk(gprune_scores(x))`` vs the kernel sequence (``ieee`` fp32 dots and ``tf32x3``).

It also checks that each kernel's kept indices equal the reference's on the timed inputs. Benchmarks are not
tests: the numbers are ratios measured in one run on one machine. Without a GPU it exits with a message.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def time_cuda(fn, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn`` with CUDA events (edgeprune.bench.roofline.cuda_event_seconds)."""
    from edgeprune.bench.roofline import cuda_event_seconds

    return statistics.median(cuda_event_seconds(fn, repeat, warmup)) * 1e3


def bench_zonal(n: int, batch: int, args) -> list[tuple]:
    """Rows for ZonalTopK at N = n: N = 576 is one 24 x 24 view, N = 2,880 five views (LLaVA-NeXT), G = 4."""
    import torch

    from edgeprune.kernels import zonal_topk as ZT
    from edgeprune.methods import gridprune_fn as G

    views, k, tau = n // 576, n // 9, 0.05
    gen = torch.Generator(device="cuda").manual_seed(0)
    zone = ((torch.arange(n) // 576) * 16 + (torch.arange(n) % 576 // 24 * 4 // 24) * 4
            + (torch.arange(n) % 24 * 4 // 24)).cuda()
    z = views * 16
    rel = torch.rand(batch, n, device="cuda", generator=gen) * 0.4
    scores = torch.rand(batch, n, device="cuda", generator=gen)
    zr = G.zone_mean(rel, zone, z)
    sizes = G.zone_sizes(zone, z)

    def reference():
        return G.zonal_topk(scores, zone, G.allocate_quotas(zr, sizes, k, tau), k)

    bufs = {"sizes": sizes.int(), "order": torch.sort(zone, stable=True).indices.int(), "zone": zone.int(),
            "out": torch.empty(batch, k, dtype=torch.int32, device="cuda"),
            "quota": torch.empty(batch, z, dtype=torch.int32, device="cuda"),
            "ws": torch.empty(batch, 3 * z, dtype=torch.int64, device="cuda")}

    def kernel():
        ZT.zonal_topk_kernel[(batch,)](scores, zr, bufs["zone"], bufs["order"], bufs["sizes"], n, z, bufs["out"],
                                       bufs["quota"], bufs["ws"], K=k, TAU=tau, ZONE_MEAN=False, **ZT.GPU_BLOCKS,
                                       num_warps=ZT.NUM_WARPS, enable_fp_fusion=False)
        return bufs["out"]

    def wrapper():
        return ZT.zonal_topk(scores, zone, k, tau, zone_relevance=zr, num_zones=z, check_inputs=False)

    ref = reference()
    t_ref = time_cuda(reference, args.warmup, args.repeat)
    rows = []
    for name, fn in (("kernel", kernel), ("wrapper", wrapper)):
        equal = torch.equal(fn().long(), ref)
        rows.append(("zonal_topk", name, n, f"Z={z}", k, t_ref, time_cuda(fn, args.warmup, args.repeat), equal))
    return rows


def bench_graph(n: int, batch: int, args) -> list[tuple]:
    """Rows for GraphRank at N = n with D = args.dim (4,096 = LLaVA's projected width), K = N / 9."""
    import torch

    from edgeprune.kernels.graph_rank import graph_rank
    from edgeprune.methods import gprune_fn as P
    from edgeprune.methods.functional import stable_topk

    k = n // 9
    gen = torch.Generator(device="cuda").manual_seed(0)
    # Clustered fp16 features (as a projector emits): a graph with real neighbourhoods, not just self-loops.
    centres = torch.randn(batch, 64, args.dim, device="cuda", generator=gen)
    label = torch.randint(0, 64, (batch, n), device="cuda", generator=gen)
    noise = torch.randn(batch, n, args.dim, device="cuda", generator=gen)
    x = (centres.gather(1, label.unsqueeze(-1).expand(-1, -1, args.dim)) + 0.8 * noise).half()

    def reference():
        return stable_topk(P.gprune_scores(x), k)

    ref = reference()
    t_ref = time_cuda(reference, args.warmup, args.repeat)
    rows = []
    for precision in ("ieee", "tf32x3"):
        def fn(precision=precision):
            return graph_rank(x, k, precision=precision, check_inputs=False)

        equal = torch.equal(fn().long(), ref)
        rows.append(("graph_rank", precision, n, f"D={args.dim}", k, t_ref, time_cuda(fn, args.warmup, args.repeat),
                     equal))
    return rows


def print_table(rows: list[tuple], device: str) -> None:
    print(f"# {device}; median of CUDA-event timings; 'equal' = same kept indices as the reference")
    print(f"{'op':<11} {'variant':<8} {'N':>5} {'shape':>7} {'K':>4} {'torch ms':>9} {'triton ms':>9} "
          f"{'speed-up':>8} {'equal':>5}")
    for op, variant, n, shape, k, t_ref, t_ker, equal in rows:
        print(f"{op:<11} {variant:<8} {n:>5} {shape:>7} {k:>4} {t_ref:>9.3f} {t_ker:>9.3f} {t_ref / t_ker:>7.2f}x "
              f"{str(equal):>5}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="576,2880", help="comma-separated N values (multiples of 576)")
    parser.add_argument("--batch", type=int, default=1, help="requests per call")
    parser.add_argument("--dim", type=int, default=4096, help="feature width D for graph_rank")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    parser.add_argument("--repeat", type=int, default=50, help="timed calls (the median is reported)")
    args = parser.parse_args(argv)
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"error: this benchmark needs torch and triton ({exc}); pip install -e '.[export,kernels]'",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; the kernel benchmark only runs on a GPU (the CPU interpreter "
              "is for tests, not timings)", file=sys.stderr)
        return 2
    from edgeprune.kernels.zonal_topk import is_interpreted

    if is_interpreted():
        print("error: triton is in interpreter mode (TRITON_INTERPRET is set); unset it to time compiled kernels",
              file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(n <= 0 or n % 576 for n in sizes):
        print(f"error: --sizes must be positive multiples of 576; got {args.sizes}", file=sys.stderr)
        return 2
    rows = []
    for n in sizes:
        rows += bench_zonal(n, args.batch, args)
        rows += bench_graph(n, args.batch, args)
    print_table(rows, torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
