"""Ahead-of-time PTX for the fused kernels (DESIGN.md §5, use 2), without a GPU, cached on disk.

``compile_ptx("zonal_topk", 87, K=64, tau=0.05)`` runs ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", sm, 32))`` and returns a :class:`CompiledKernel`: the PTX, the cubin when ``ptxas``
is available, and the launch contract (grid, block, shared memory, argument order) a TensorRT plugin needs.
``compile_sequence("graph_rank", ...)`` returns GraphRank's launch sequence (one entry per launch).

PTX details that matter on devices:

* Triton appends two hidden pointer parameters (global and profile scratch). Our kernels use neither (the
  sizes are checked to be 0), so they are removed from the PTX entry: the kernel takes exactly the arguments
  of ``arg_order`` (inputs, int32 scalars, outputs: the TensorRT AOT plugin order). The edited PTX is
  re-assembled with ``ptxas`` where present, which is what ``cubin`` holds.
* The PTX ISA version must be one the device driver can JIT: the defaults are 8.0 for sm_75 to sm_90 (any
  CUDA 12 driver, e.g. JetPack 6.x), 8.7 / 8.8 for sm_120 / sm_121 (CUDA 12.8 / 12.9) and 9.0 for sm_110
  (JetPack 7.0, CUDA 13.0); ``ptx_version`` overrides them (at least :data:`MIN_PTX_VERSION`).
* From sm_90 on, Triton targets ``sm_90a`` / ``sm_110a`` / ``sm_120a`` (architecture-specific PTX): it runs on
  that architecture only. PTX for sm_75..sm_89 is JIT-compiled forward by the driver onto later GPUs.

The cache directory is the caller's (default ``~/.cache/edgeprune/ptx``); entries are keyed by op, sm, the
baked constants, the PTX version, the Triton version and a hash of the kernel source, and Triton's own
compile cache is redirected below it for the duration of the call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .._deps import require
from ..errors import EdgepruneError, UnknownNameError

# Jetson Orin (87), Hopper (90), Thor (110), and the TensorRT-for-RTX targets: Turing (75), Ampere (80, 86),
# Ada (89), Blackwell consumer / DGX Spark (120, 121).
SUPPORTED_SM = (75, 80, 86, 87, 89, 90, 110, 120, 121)
# The lowest PTX ISA each target accepts (LLVM aborts the whole process below it, so it is checked first) and
# the default: as low as works, so that older drivers can JIT it (8.0 = CUDA 12.0, 8.7 = 12.8, 8.8 = 12.9,
# 9.0 = CUDA 13.0).
MIN_PTX_VERSION = {75: 63, 80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 110: 90, 120: 87, 121: 88}
DEFAULT_PTX_VERSION = {75: 80, 80: 80, 86: 80, 87: 80, 89: 80, 90: 80, 110: 90, 120: 87, 121: 88}
DEFAULT_CACHE_DIR = Path("~/.cache/edgeprune/ptx")


@dataclass(frozen=True)
class CompiledKernel:
    """One compiled kernel and its launch contract.

    Attributes:
        op: the kernel's name in :data:`SPECS` (e.g. ``zonal_topk``, ``graph_rank.sim``).
        sm: the compute capability, e.g. 87.
        kernel_name: the PTX entry name (``cuModuleGetFunction``).
        ptx: the PTX text (hidden scratch parameters removed).
        cubin: the assembled cubin, or None when no ``ptxas`` was found.
        grid: the grid for the given ``B``/``N`` constants, or None when they were not given.
        grid_formula: the grid as a formula of B and N, e.g. ``(B, cdiv(N, 64), 1)``.
        block: threads per block, ``(32 * num_warps, 1, 1)`` (the PTX pins it with ``.reqntid``).
        num_warps: warps per block.
        shared_mem: dynamic shared memory bytes to request at launch.
        arg_order: ``(name, dtype)`` of every kernel argument in launch order (``*fp32`` = pointer).
        constants: the values baked into the PTX (constexprs).
        ptx_version: the PTX ISA version, e.g. 85 for 8.5.
        triton_version: the Triton that compiled it.
    """

    op: str
    sm: int
    kernel_name: str
    ptx: str
    cubin: bytes | None
    grid: tuple[int, int, int] | None
    grid_formula: str
    block: tuple[int, int, int]
    num_warps: int
    shared_mem: int
    arg_order: tuple[tuple[str, str], ...]
    constants: dict = field(default_factory=dict)
    ptx_version: int = 0
    triton_version: str = ""


@dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel: its module, arguments, constants and grid.

    Attributes:
        op: public name.
        module, kernel: where the ``@triton.jit`` function lives (``edgeprune.kernels.<module>.<kernel>``).
        required: constants the caller must give.
        defaults: optional constants and their defaults (``B``/``N`` only fill in the grid).
        args: constants -> ``(name, dtype)`` of the runtime arguments in launch order.
        constexprs: constants -> the constexpr values baked into the PTX.
        grid_block: constants -> the tokens per program along grid axis 1 (None: one program per request).
        fp_fusion: allow FMA contraction (off where the arithmetic must round like the reference).
    """

    op: str
    module: str
    kernel: str
    required: tuple[str, ...]
    defaults: dict
    args: Callable[[dict], list[tuple[str, str]]]
    constexprs: Callable[[dict], dict]
    grid_block: Callable[[dict], int | None]
    num_warps: int = 4
    fp_fusion: bool = True
    flat: bool = False  # grid (cdiv(max(N, Z), block), 1, 1) instead of one row of programs per request

    def resolve(self, given: dict) -> dict:
        """The full constant set from ``given`` and the defaults.

        Raises:
            EdgepruneError: a required constant is missing or an unknown one is given.
        """
        unknown = sorted(set(given) - set(self.required) - set(self.defaults))
        missing = sorted(set(self.required) - set(given))
        if unknown or missing:
            raise EdgepruneError(f"{self.op}: constants {self.required} are required and "
                                 f"{tuple(self.defaults)} optional; missing {missing}, unknown {unknown}")
        return {**self.defaults, **given}

    def grid_formula(self, consts: dict) -> str:
        block = self.grid_block(consts)
        if self.flat:
            return f"(cdiv(max(N, Z), {block}), 1, 1)"
        return "(B, 1, 1)" if block is None else f"(B, cdiv(N, {block}), 1)"

    def grid(self, consts: dict) -> tuple[int, int, int] | None:
        """The grid for the given B and N (flat specs: N and Z), or None when one is missing."""
        block = self.grid_block(consts)
        if self.flat:
            if consts.get("N") is None or consts.get("Z") is None:
                return None
            return (-(-max(int(consts["N"]), int(consts["Z"])) // block), 1, 1)
        if consts.get("B") is None or consts.get("N") is None:
            return None
        return (int(consts["B"]), 1 if block is None else -(-int(consts["N"]) // block), 1)


def _blocks(module: str, kind: str | None = None) -> dict:
    """The GPU block sizes the torch wrappers use, so AOT and JIT kernels are the same code."""
    blocks = importlib.import_module(f"edgeprune.kernels.{module}").GPU_BLOCKS
    return dict(blocks[kind] if kind else blocks)


_SHAPES = {"B": None, "N": None}
_GR = "graph_rank"
SPECS: dict[str, KernelSpec] = {
    "zonal_topk": KernelSpec(
        "zonal_topk", "zonal_topk", "zonal_topk_kernel", ("K", "tau"),
        {"zone_mean": False, "scores_dtype": "fp32", **_SHAPES},
        lambda c: [("scores", f"*{c['scores_dtype']}"), ("rel", "*fp32" if c["zone_mean"] else "*fp64"),
                   ("zone", "*i32"), ("order", "*i32"), ("sizes", "*i32"), ("N", "i32"), ("Z", "i32"),
                   ("out", "*i32"), ("quota", "*i32"), ("ws", "*i64")],
        lambda c: {"K": int(c["K"]), "TAU": float(c["tau"]), "ZONE_MEAN": bool(c["zone_mean"]),
                   **_blocks("zonal_topk")},
        lambda c: None, fp_fusion=False),
    "zone_index": KernelSpec(
        "zone_index", "zone_index", "zone_index_kernel", (), {"Z": None, **_SHAPES},
        lambda c: [("zone", "*i32"), ("N", "i32"), ("Z", "i32"), ("order", "*i32"), ("sizes", "*i32")],
        lambda c: _blocks("zone_index"),
        lambda c: _blocks("zone_index")["BLOCK_M"], flat=True),
    "graph_rank.norm": KernelSpec(
        "graph_rank.norm", _GR, "graph_norm_kernel", (), {"x_dtype": "fp32", **_SHAPES},
        lambda c: [("x", f"*{c['x_dtype']}"), ("N", "i32"), ("D", "i32"), ("norm", "*fp32"), ("thr", "*i32")],
        lambda c: _blocks(_GR, "norm"),
        lambda c: _blocks(_GR, "norm")["BLOCK_M"]),
    "graph_rank.sim": KernelSpec(
        "graph_rank.sim", _GR, "graph_sim_kernel", (),
        {"threshold": 0.5, "temperature": 0.03, "precision": "ieee", "x_dtype": "fp32", **_SHAPES},
        lambda c: [("x", f"*{c['x_dtype']}"), ("norm", "*fp32"), ("N", "i32"), ("D", "i32"), ("attn", "*fp32"),
                   ("deg", "*fp32")],
        lambda c: {"THETA": float(c["threshold"]), "TEMP": float(c["temperature"]), "PRECISION": c["precision"],
                   **_blocks(_GR, "sim")},
        lambda c: _blocks(_GR, "sim")["BLOCK_M"]),
    "graph_rank.step": KernelSpec(
        "graph_rank.step", _GR, "graph_step_kernel", (), dict(_SHAPES),
        lambda c: [("attn", "*fp32"), ("v_in", "*fp32"), ("N", "i32"), ("v_out", "*fp32")],
        lambda c: _blocks(_GR, "step"),
        lambda c: _blocks(_GR, "step")["BLOCK_N"]),
    "graph_rank.select": KernelSpec(
        "graph_rank.select", _GR, "graph_select_kernel", ("K",), dict(_SHAPES),
        lambda c: [("v", "*fp32"), ("deg", "*fp32"), ("N", "i32"), ("score", "*fp32"), ("thr", "*i32"),
                   ("out", "*i32")],
        lambda c: {"K": int(c["K"]), **_blocks(_GR, "select")},
        lambda c: _blocks(_GR, "select")["BLOCK_M"]),
    "graph_rank.emit": KernelSpec(
        "graph_rank.emit", _GR, "graph_emit_kernel", ("K",), dict(_SHAPES),
        lambda c: [("score", "*fp32"), ("thr", "*i32"), ("N", "i32"), ("out", "*i32")],
        lambda c: {"K": int(c["K"]), **_blocks(_GR, "emit")},
        lambda c: _blocks(_GR, "emit")["BLOCK_M"]),
}
SEQUENCES = {
    "zonal_topk": ("zonal_topk",),
    "graph_rank": ("graph_rank.norm", "graph_rank.sim", "graph_rank.step", "graph_rank.select", "graph_rank.emit"),
}


def find_ptxas(sm: int) -> str | None:
    """Path of a ``ptxas`` that knows ``sm``: Triton's bundled one, else one on PATH; None when absent."""
    triton = require("triton")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # Triton ships a CUDA 12 ptxas and a newer one ("ptxas-blackwell") used for sm >= 90.
    for name in (("ptxas-blackwell", "ptxas") if sm >= 90 else ("ptxas", "ptxas-blackwell")):
        if (bundled / name).is_file():
            return str(bundled / name)
    return shutil.which("ptxas")


def assemble(ptx: str, sm: int, ptxas: str | None = None) -> bytes | None:
    """Assemble PTX into a cubin with ``ptxas`` (None when no ptxas is available).

    Raises:
        EdgepruneError: ptxas rejected the PTX (its message is included).
    """
    ptxas = ptxas or find_ptxas(sm)
    if ptxas is None:
        return None
    arch = f"sm_{sm}a" if sm >= 90 else f"sm_{sm}"
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, f"--gpu-name={arch}", str(src), "-o", str(dst)], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise EdgepruneError(f"ptxas ({ptxas}) rejected the PTX for {arch}: {proc.stderr.strip()}")
        return dst.read_bytes()


def _strip_hidden_params(ptx: str, name: str, n_args: int) -> str:
    """Remove the entry parameters after the first ``n_args`` when the body never reads them."""
    head, sep, body = ptx.partition(f".entry {name}(")
    params, close, rest = body.partition(")")
    lines = [ln for ln in params.strip().split("\n") if ln.strip()]
    if not sep or len(lines) <= n_args:
        return ptx
    extra = lines[n_args:]
    for ln in extra:
        if re.search(rf"\b{re.escape(ln.strip().rstrip(',').split()[-1])}\b", rest):
            return ptx  # a hidden parameter is used: keep the entry as Triton wrote it
    kept = lines[:n_args]
    kept[-1] = kept[-1].rstrip(",")
    return head + sep + "\n" + "\n".join(kept) + "\n" + close + rest


def _cache_key(spec: KernelSpec, sm: int, consts: dict, ptx_version: int) -> str:
    triton = require("triton")
    # The kernel source and this file (argument specs, PTX post-processing) both shape the result.
    source = Path(importlib.util.find_spec(f"edgeprune.kernels.{spec.module}").origin).read_bytes()
    source += Path(__file__).read_bytes()
    blob = json.dumps([spec.op, sm, sorted(consts.items()), ptx_version, triton.__version__,
                       hashlib.sha256(source).hexdigest()], default=str)
    return f"{spec.op}-sm{sm}-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def _load_cached(cache: Path, key: str) -> CompiledKernel | None:
    meta = cache / f"{key}.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    cubin = cache / f"{key}.cubin"
    data.update(ptx=(cache / f"{key}.ptx").read_text(), cubin=cubin.read_bytes() if cubin.is_file() else None)
    for name in ("grid", "block"):
        data[name] = tuple(data[name]) if data[name] is not None else None
    data["arg_order"] = tuple(tuple(a) for a in data["arg_order"])
    return CompiledKernel(**data)


def _store(cache: Path, key: str, kernel: CompiledKernel) -> None:
    """Write the entry through temporary files and renames, so an interrupted write leaves no partial entry."""
    cache.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in asdict(kernel).items() if k not in ("ptx", "cubin")}
    files = {f"{key}.ptx": kernel.ptx.encode(), f"{key}.json": json.dumps(meta, indent=1).encode()}
    if kernel.cubin is not None:
        files[f"{key}.cubin"] = kernel.cubin
    for name in sorted(files, key=lambda n: n.endswith(".json")):  # metadata last: it marks the entry valid
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(files[name])
        os.replace(tmp, cache / name)


def _compile(spec: KernelSpec, sm: int, consts: dict, ptx_version: int, cache: Path) -> CompiledKernel:
    triton = require("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"edgeprune.kernels.{spec.module}"), spec.kernel)
    args = spec.args(consts)
    constexprs = spec.constexprs(consts)
    params = [name for name in fn.arg_names if name not in constexprs]
    if len(params) != len(args):
        raise EdgepruneError(f"{spec.op}: the spec lists {len(args)} arguments, the kernel has {params}")
    signature = {p: dtype for p, (_, dtype) in zip(params, args)} | {name: "constexpr" for name in constexprs}
    options = {"num_warps": spec.num_warps, "enable_fp_fusion": spec.fp_fusion, "ptx_version": ptx_version}
    with triton.knobs.cache.scope():
        triton.knobs.cache.dir = str(cache / "triton")  # keep Triton's own cache out of ~/.triton
        ck = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", sm, 32), options=options)
    md = ck.metadata
    if md.global_scratch_size or md.profile_scratch_size:
        raise EdgepruneError(f"{spec.op}: the kernel needs Triton scratch memory, which the launch contract "
                             "does not provide; this is a bug in the kernel")
    ptx = _strip_hidden_params(ck.asm["ptx"], md.name, len(args))
    return CompiledKernel(
        op=spec.op, sm=sm, kernel_name=md.name, ptx=ptx, cubin=assemble(ptx, sm), grid=spec.grid(consts),
        grid_formula=spec.grid_formula(consts), block=(32 * md.num_warps, 1, 1), num_warps=md.num_warps,
        shared_mem=md.shared, arg_order=tuple(args), constants=constexprs, ptx_version=ptx_version,
        triton_version=triton.__version__,
    )


def compile_ptx(op: str, sm: int, *, cache_dir: str | os.PathLike | None = None, ptx_version: int | None = None,
                **constants) -> CompiledKernel:
    """Compile one kernel to PTX (and a cubin) for ``sm`` without a GPU, through an on-disk cache.

    Args:
        op: a kernel of :data:`SPECS`: ``zonal_topk``, ``zone_index``, ``graph_rank.norm``, ``graph_rank.sim``,
            ``graph_rank.step``, ``graph_rank.select`` or ``graph_rank.emit``.
        sm: compute capability, one of :data:`SUPPORTED_SM` (e.g. 87 Orin, 90 H100/H200, 110 Thor, 86/89/120
            for TensorRT for RTX).
        cache_dir: cache directory (default ``~/.cache/edgeprune/ptx``).
        ptx_version: PTX ISA version as an int (85 = 8.5); default per sm, see the module docstring.
        constants: the op's constants, e.g. ``K=64, tau=0.05`` for ``zonal_topk`` (the spec lists them);
            ``B`` and ``N`` are optional and only fill in :attr:`CompiledKernel.grid`.
    Returns:
        The :class:`CompiledKernel`.
    Raises:
        UnknownNameError: an unknown op.
        EdgepruneError: an unsupported sm, a missing or unknown constant, or ptxas rejecting the PTX.
        MissingDependencyError: triton is not installed.
    """
    if op not in SPECS:
        raise UnknownNameError("kernel", op, sorted(SPECS), hint="GraphRank is a sequence: use compile_sequence")
    if sm not in SUPPORTED_SM:
        raise EdgepruneError(f"compile_ptx: sm must be one of {SUPPORTED_SM}; got {sm}")
    spec = SPECS[op]
    consts = spec.resolve(constants)
    ptx_version = ptx_version or DEFAULT_PTX_VERSION[sm]
    if ptx_version < MIN_PTX_VERSION[sm]:
        raise EdgepruneError(f"compile_ptx: sm_{sm} needs PTX ISA >= {MIN_PTX_VERSION[sm] / 10:.1f}; got "
                             f"{ptx_version / 10:.1f}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR.expanduser()
    key = _cache_key(spec, sm, consts, ptx_version)
    hit = _load_cached(cache, key)
    if hit is None and _interpreted():
        _compile_in_child("compile_ptx", op, sm, cache, ptx_version, constants)
        hit = _load_cached(cache, key)
    if hit is not None:
        return hit
    kernel = _compile(spec, sm, consts, ptx_version, cache)
    _store(cache, key, kernel)
    return kernel


def _interpreted() -> bool:
    return bool(require("triton").knobs.runtime.interpret)


def _compile_in_child(fn: str, op: str, sm: int, cache: Path, ptx_version: int | None, constants: dict) -> None:
    """Compile in a fresh Python without ``TRITON_INTERPRET``; the result lands in the shared disk cache.

    A process that imported triton in interpreter mode holds interpreter versions of triton's own library
    functions (``tl.sum``, ``tl.cumsum``, ...), which the compiler cannot lower, so compiling there is not possible.

    Raises:
        EdgepruneError: the child failed (its stderr is included).
    """
    job = {"fn": fn, "op": op, "sm": sm, "cache_dir": str(cache), "ptx_version": ptx_version, "kwargs": constants}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the child must compile for real
    proc = subprocess.run([sys.executable, "-m", "edgeprune.kernels.aot"], input=json.dumps(job), text=True,
                          capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        raise EdgepruneError(f"AOT compilation of {op} for sm_{sm} failed: {proc.stderr.strip()[-2000:]}")


def compile_sequence(op: str, sm: int, **kwargs) -> list[CompiledKernel]:
    """Every launch of a fused op in order: ``zonal_topk`` is one launch, ``graph_rank`` is norm, sim,
    ``steps`` times step (buffers alternate, see graph_rank's docstring), select, emit.

    Args:
        op: ``zonal_topk`` or ``graph_rank``.
        sm, kwargs: as :func:`compile_ptx` (``steps`` picks the number of step launches, default 5).
    Returns:
        The kernels in launch order (the step kernel repeated).
    Raises:
        UnknownNameError: an unknown op; and what :func:`compile_ptx` raises.
    """
    if op not in SEQUENCES:
        raise UnknownNameError("fused op", op, sorted(SEQUENCES))
    if sm not in SUPPORTED_SM:
        raise EdgepruneError(f"compile_sequence: sm must be one of {SUPPORTED_SM}; got {sm}")
    steps = int(kwargs.pop("steps", 5))
    options = {k: kwargs.pop(k) for k in ("cache_dir", "ptx_version") if k in kwargs}
    known = {name for kop in SEQUENCES[op] for name in (*SPECS[kop].required, *SPECS[kop].defaults)}
    if set(kwargs) - known:
        raise EdgepruneError(f"{op}: unknown constants {sorted(set(kwargs) - known)}; known: {sorted(known)}")
    cache = Path(options.get("cache_dir") or DEFAULT_CACHE_DIR).expanduser()
    version = options.get("ptx_version")
    if _interpreted() and not all(_cached(kop, sm, cache, version, kwargs) for kop in SEQUENCES[op]):
        _compile_in_child("compile_sequence", op, sm, cache, version, kwargs)
    out = []
    for kernel_op in SEQUENCES[op]:
        kernel = compile_ptx(kernel_op, sm, **options, **_own(SPECS[kernel_op], kwargs))
        out.extend([kernel] * (steps if kernel_op.endswith(".step") else 1))
    return out


def _own(spec: KernelSpec, kwargs: dict) -> dict:
    """The constants of a sequence that belong to one of its kernels."""
    return {k: v for k, v in kwargs.items() if k in spec.required or k in spec.defaults}


def _cached(op: str, sm: int, cache: Path, ptx_version: int | None, kwargs: dict) -> bool:
    spec = SPECS[op]
    key = _cache_key(spec, sm, spec.resolve(_own(spec, kwargs)), ptx_version or DEFAULT_PTX_VERSION[sm])
    return (cache / f"{key}.json").is_file()


def _main() -> None:
    """Child entry point of :func:`_compile_in_child`: a JSON job on stdin."""
    job = json.loads(sys.stdin.read())
    common = {"cache_dir": job["cache_dir"], "ptx_version": job["ptx_version"]}
    if job["fn"] == "compile_ptx":
        compile_ptx(job["op"], job["sm"], **common, **job["kwargs"])
    else:
        compile_sequence(job["op"], job["sm"], **common, **job["kwargs"])


if __name__ == "__main__":
    _main()
