"""Argument groups shared by subcommands."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..errors import EdgepruneError


def add_model_args(p: argparse.ArgumentParser, default: str | None = "tiny-llava") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help="preset name (see `edgeprune models`), a local LLaVA "
                   "directory or a Hugging Face id (default: %(default)s)")
    g.add_argument("--random-weights", action="store_true",
                   help="build a named preset's architecture with random weights and a synthetic tokenizer "
                        "(offline latency measurements)")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="model dtype")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")


def add_method_args(p: argparse.ArgumentParser, default: str = "none", kernels: bool = True) -> None:
    """--method, --tokens/--ratio, --method-arg, --clip and (``kernels``) --kernels, which only the commands that
    run the torch backend take: a bundle's fused nodes are chosen when it is built, not exported."""
    g = p.add_argument_group("pruning")
    g.add_argument("--method", default=default, help="pruning method (see `edgeprune methods`; default: %(default)s)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, help="keep K visual tokens (1 <= K <= N)")
    budget.add_argument("--ratio", type=float, help="keep round(r*N) visual tokens, r in (0, 1]")
    g.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, repeatable (e.g. --method-arg seed=3)")
    if kernels:
        g.add_argument("--kernels", default="torch", choices=("torch", "triton"),
                       help="pruning implementation: torch (reference) or triton (fused ZonalTopK/GraphRank kernels "
                            "for gridprune/gprune; needs CUDA, or TRITON_INTERPRET=1 on CPU)")
    g.add_argument("--clip", metavar="CLIP", help="CLIP checkpoint (directory or hub id, e.g. "
                   "openai/clip-vit-large-patch14-336) for text-guided methods (gridprune guidance=clip); "
                   "'tiny-clip' is built offline and is the default for the tiny presets")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed")


def add_ort_args(p: argparse.ArgumentParser, providers_default: str | None = "cpu",
                 providers_help: str = "default: %(default)s") -> None:
    """``--providers`` and ``--ort-decoder`` of the ort backend."""
    from ..bundle.format import ORT_DECODER_CHOICES

    g = p.add_argument_group("onnx runtime")
    g.add_argument("--providers", default=providers_default, help="ONNX Runtime execution providers in priority "
                   f"order, e.g. cuda,cpu ({providers_help})")
    g.add_argument("--ort-decoder", default="auto", choices=ORT_DECODER_CHOICES,
                   help="which decoder file to run: fused (decoder.ort.onnx: opset-23 fused Attention, fastest in "
                        "ONNX Runtime), portable (decoder.onnx: opset 18, what TensorRT builds), or auto (fused on "
                        "the CPU provider when the bundle has it, else portable; default)")


def check_positive(value: int, flag: str) -> None:
    if value <= 0:
        raise EdgepruneError(f"{flag} must be a positive integer; got {value}")


def check_output_file(path: str, flag: str, suffix: str | None = None, create_parent: bool = False) -> Path:
    """An output file path, checked before any work: not a directory, ``suffix`` when given, and a parent
    directory that exists (or, with ``create_parent``, can be created when the file is written).

    Raises:
        EdgepruneError: the path is a directory, has the wrong suffix, or its directory is missing / a file.
    """
    out = Path(path)
    if suffix and out.suffix.lower() != suffix:
        raise EdgepruneError(f"{flag} must be a {suffix} file; got {path!r} (e.g. {flag} out{suffix})")
    if out.is_dir() or path.endswith(os.sep):
        raise EdgepruneError(f"{flag} {path!r} is a directory; give a file name such as "
                             f"{str(out / ('out' + (suffix or '.json')))!r}")
    parent = out.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise EdgepruneError(f"{flag} {path!r}: {str(existing)!r} is a file, not a directory")
    if not parent.is_dir() and not create_parent:
        raise EdgepruneError(f"{flag} {path!r}: the directory {str(parent)!r} does not exist; create it first")
    return out


def write_json_atomic(path: Path, data: Any, flag: str) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary sibling and a rename: never half-written.

    Raises:
        EdgepruneError: the file cannot be written (permissions, disk full), naming the flag.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EdgepruneError(f"cannot write {flag} {str(path)!r}: {exc.strerror or exc}") from None


def refuse_with_bundle(args: argparse.Namespace, flags: dict[str, str]) -> None:
    """Refuse flags that do not apply to a bundle: ``flags`` maps a namespace attribute to its flag. An attribute
    counts as given when it is truthy and not a parser default (:class:`Default`).

    Raises:
        EdgepruneError: names every such flag and why.
    """
    given = [flag for attr, flag in flags.items()
             if getattr(args, attr, None) and not isinstance(getattr(args, attr), Default)]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise EdgepruneError(f"{' and '.join(given)} {verb} not apply to --bundle: the bundle fixes the model, its "
                             "weights, dtype and graphs (re-export to change them; --providers picks where it runs)")


class Default(str):
    """A default value that can be told apart from the same string typed by the user."""
