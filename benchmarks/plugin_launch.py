"""The TensorRT plugins' launch path on a GPU: exact indices vs the reference, and its latency.

    python benchmarks/plugin_launch.py --out DIR              # on a CUDA GPU (cuda-python, torch, triton)
    python benchmarks/plugin_launch.py --out DIR --dry-run    # on a CPU: everything but the driver calls

This is what an IPluginV3 ``enqueue`` runs (``edgeprune.engines.plugins.launch.PluginLauncher.run``): the
op's PTX for the device's SM (compiled once, cached under ``DIR/ptx``), loaded with ``cuModuleLoadData``,
launched with ``cuLaunchKernel`` on a CUDA stream with device pointers in TensorRT's argument order (inputs,
int32 scalars, outputs; GraphRank's scratch carved from one workspace buffer). For ZonalTopK and GraphRank at
LLaVA-1.5 (N = 576) and LLaVA-NeXT (N = 2,880) sizes it checks the kept indices against ``edgeprune.methods``
(exact; for GraphRank, where the input has a near-tie at the K-th score, the scores within fp32 tolerance
instead, reported as ``near-tie``) and times the launch path with CUDA events (median of ``--repeat`` calls
after a warm-up), next to the Triton JIT wrappers of the same kernels. It writes ``DIR/plugin_launch.json``.

``--dry-run`` uses a recording driver and CPU tensors: PTX selection and compilation (sm_90 by default),
argument packing, workspace carving and the PTX parameter lists are checked, nothing is launched. Exit code
1 when any check fails. Benchmarks are not tests: the numbers are one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

SIZES = [("ZonalTopK", 576, 64), ("ZonalTopK", 576, 192), ("ZonalTopK", 2880, 320), ("ZonalTopK", 2880, 640),
         ("GraphRank", 576, 64), ("GraphRank", 576, 192), ("GraphRank", 2880, 320), ("GraphRank", 2880, 640)]


def time_cuda(fn, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn`` with CUDA events (edgeprune.bench.roofline.cuda_event_seconds)."""
    from edgeprune.bench.roofline import cuda_event_seconds

    return statistics.median(cuda_event_seconds(fn, repeat, warmup)) * 1e3


def _triton_wrapper(case):
    """The same kernels through their torch-facing Triton wrappers (JIT launch), for comparison."""
    a = case.attrs
    if case.op == "ZonalTopK":
        from edgeprune.kernels.zonal_topk import zonal_topk

        scores, rel, zone = case.inputs
        return lambda: zonal_topk(scores, zone, a["K"], a["tau"], token_relevance=rel, num_zones=a["num_zones"],
                                  check_inputs=False)
    from edgeprune.kernels.graph_rank import graph_rank

    return lambda: graph_rank(case.inputs[0], a["K"], a["threshold"], a["temperature"], a["steps"],
                              check_inputs=False)


def check_dry(case, launcher) -> dict:
    """Run the launch path with the recording driver; check every recorded launch against the contract."""
    from edgeprune.engines.plugins import contract as C
    from edgeprune.engines.plugins.check import run_case

    outputs, ws = run_case(case, launcher, stream=0)
    shapes = [tuple(t.shape) for t in case.inputs]
    dims, layout, seq = launcher.plan(shapes)
    kernels = launcher.kernels()
    problems = []
    for (name, grid, block, shared, _stream, values), launch in zip(launcher.driver.launches, seq):
        ck = kernels[launch.kernel]
        want = [v for _, v in C.bind(launch, [t.data_ptr() for t in case.inputs], [t.data_ptr() for t in outputs],
                                     ws.data_ptr(), layout)]
        params = C.ptx_params(ck.ptx, ck.kernel_name)
        if values != want or grid != launch.grid or block != ck.block or len(params) != len(values):
            problems.append(f"{launch.kernel}: recorded {values} {grid} {block}, want {want} {launch.grid}")
        end = max(o + n for o, n in layout.slots.values())
        if end > ws.numel():
            problems.append(f"workspace carving overruns: {end} > {ws.numel()}")
    return {"launches": len(seq), "workspace_bytes": layout.nbytes, "dims": dims, "ok": not problems,
            "problems": problems, "kernels": sorted({launch.kernel for launch in seq})}


def check_gpu(case, launcher, warmup: int, repeat: int) -> dict:
    """Exactness vs the reference, then the latency of the launch path and of the Triton wrapper."""
    import torch

    from edgeprune.engines.plugins.check import allocate, reference_indices, run_case, scores_close

    stream = torch.cuda.current_stream().cuda_stream
    buffers = allocate(case)
    (out, *_), ws = run_case(case, launcher, stream, buffers)
    torch.cuda.synchronize()
    ref = reference_indices(case)
    equal = bool(torch.equal(out.cpu(), ref))
    _, layout, seq = launcher.plan([tuple(t.shape) for t in case.inputs])
    verdict = "exact" if equal else ("near-tie" if case.op == "GraphRank" and not case.exact
                                     and scores_close(case, ws) else "MISMATCH")
    ms = time_cuda(lambda: run_case(case, launcher, stream, buffers), warmup, repeat)
    wrapper = _triton_wrapper(case)
    ms_wrapper = time_cuda(wrapper, warmup, repeat)
    return {"verdict": verdict, "ok": verdict != "MISMATCH", "launches": len(seq), "workspace_bytes": layout.nbytes,
            "ms_launch_path": round(ms, 4), "ms_triton_wrapper": round(ms_wrapper, 4),
            "kept_equal_reference": equal}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for plugin_launch.json and the PTX cache")
    ap.add_argument("--dry-run", action="store_true", help="CPU: record the driver calls instead of making them")
    ap.add_argument("--sm", type=int, default=90, help="dry run: the SM the recording driver reports (default 90)")
    ap.add_argument("--dim", type=int, default=4096, help="GraphRank feature size D (LLaVA-7B hidden: 4096)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=100)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from edgeprune.engines.plugins.check import make_case
    from edgeprune.engines.plugins.launch import PluginLauncher, RecordingDriver, ptx_target

    device = "cpu"
    if not args.dry_run:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU; use --dry-run on a CPU", file=sys.stderr)
            return 2
        torch.zeros(1, device="cuda")  # torch's primary context becomes current for the driver calls
        device = "cuda"
    report = {"dry_run": args.dry_run, "python": platform.python_version(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (recording driver)",
              "batch": args.batch, "dim": args.dim, "results": []}
    failed = False
    for op, n, k in SIZES:
        start = time.perf_counter()
        d = min(args.dim, 64) if args.dry_run else args.dim  # D is only a scalar argument to the dry run
        case = make_case(op, n, k, batch=args.batch, d=d, device=device)
        driver = RecordingDriver(sm=args.sm) if args.dry_run else None
        launcher = PluginLauncher(op, case.attrs, driver=driver, cache_dir=str(out / "ptx"))
        result = {"op": op, "n": n, "k": k, "sm": launcher.sm,
                  **(check_dry(case, launcher) if args.dry_run else
                     check_gpu(case, launcher, args.warmup, args.repeat))}
        result["wall_s"] = round(time.perf_counter() - start, 2)
        report["results"].append(result)
        failed |= not result["ok"]
        timing = "" if args.dry_run else f" {result['ms_launch_path']:.3f} ms (Triton JIT {result['ms_triton_wrapper']:.3f} ms)"
        print(f"{op:9s} N={n:5d} K={k:4d} sm_{launcher.sm}: {result.get('verdict', 'ok' if result['ok'] else 'FAIL')}"
              f"{timing}, {result['launches']} launches, {result['workspace_bytes']} B workspace", flush=True)
    report["ptx_target_examples"] = {sm: ptx_target(sm) for sm in (75, 86, 87, 89, 90, 100, 120)}
    path = out / "plugin_launch.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
