"""The bundle format's names and the two primitives every reader and writer shares: hashing and confinement.

A bundle is a directory (see ``docs/bundle-format.md``)::

    manifest.json            format + version, model, method, K/N, graphs (spec, files), preprocessing,
                             prompt, tokenizer, vision geometry, library versions, opset, sha256 of every file
    vision.onnx(.data)       CLIP + projector (+ CLIP-space patch embeddings for GridPrune with CLIP guidance)
    guidance.onnx(.data)     GridPrune with CLIP guidance: the CLIP text tower
    prune.onnx(.data)        pre-LLM methods with a budget (GridPrune/G-Prune: a fused edgeprune-domain node)
    embed.onnx(.data)        the LLM's token embedding
    prefill.onnx(.data)      in-LLM methods (FastV, FitPrune): prefill with in-graph drops, ragged presents
    decoder.onnx(.data)      decode (pre-LLM methods: prefill and decode; in-LLM: decode over the ragged cache)
    decoder.ort.onnx         the same decoder at opset 23 (fused Attention) for ONNX Runtime, reading
                             decoder.onnx.data (also prefill.ort.onnx); absent with --no-ort-variant or opset 23
    tokenizer.json ...       the tokenizer as written by ``save_pretrained`` (the runtime reads tokenizer.json)
    clip_tokenizer/          GridPrune with CLIP guidance: the CLIP tokenizer
    image_newline.npy        LLaVA-NeXT only: the newline embedding the host splices after every grid row
    engines/                 optional TensorRT plans (``edgeprune build``), hashed like every other file

Standard library only: both ``export/`` (torch) and ``runtime/`` (torch-free) import it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import BundleError

FORMAT = "edgeprune-bundle"
FORMAT_VERSION = 2  # 2: graph files carry their export record (bundle.onnx_meta)
MANIFEST = "manifest.json"
NEWLINE_FILE = "image_newline.npy"
TOKENIZER_FILE = "tokenizer.json"
CLIP_TOKENIZER_DIR = "clip_tokenizer"  # GridPrune with CLIP guidance: the CLIP text tower's tokenizer
ENGINES_DIR = "engines"  # TensorRT plans, one folder per <flavour>-<version>-sm<cc>
# The top-level manifest sections every reader may rely on (checked when a bundle is opened).
REQUIRED = ("format", "format_version", "model", "method", "graphs", "preprocessing", "prompt", "tokenizer",
            "vision", "max_positions", "opset", "libraries", "files")

# The fused-attention variant of an LLM graph (:mod:`edgeprune.export.ort_variant` writes it).
VARIANT = "ort"  # the manifest key of the variant: graphs.<name>.variants.ort
VARIANT_OPSET = 23  # the first opset with the fused Attention op
# --ort-decoder: which file of a graph with a variant ONNX Runtime runs (edgeprune.runtime.ort_backend).
ORT_DECODER_CHOICES = ("auto", "fused", "portable")

# Temporary folders of an export next to its target ``<name>``: ``.<name>.tmp-*`` (being written) and
# ``.<name>.old-*`` (the replaced bundle during ``--force``); each holds :data:`OWNER_FILE` (pid, host).
TMP_TAG, OLD_TAG = ".tmp-", ".old-"
OWNER_FILE = ".edgeprune-export"

REEXPORT = "re-export it with `edgeprune export ... --force`"


def variant_file(name: str) -> str:
    """``decoder`` -> ``decoder.ort.onnx``."""
    return f"{name}.{VARIANT}.onnx"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (bundles of 7B models hold multi-GB sidecars).

    Raises:
        OSError: the file cannot be read (callers turn it into a :class:`BundleError`).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file under ``root`` except the manifest and an export's owner file, as sorted POSIX paths relative
    to ``root``."""
    base = Path(root)
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                  if p.is_file() and p not in (base / MANIFEST, base / OWNER_FILE))


def file_hashes(root: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of the bundle (see :func:`bundle_files`)."""
    return {rel: sha256_file(Path(root) / rel) for rel in bundle_files(root)}


def check_member_name(rel: object, where: str) -> str:
    """Refuse a manifest path that is not a plain relative POSIX path inside the bundle (no file access).

    Args:
        rel: the path as written in the manifest; where: its JSON path, for the message.
    Returns:
        ``rel``.
    Raises:
        BundleError: not a string, empty, absolute (POSIX or Windows), with a ``..`` or ``.`` part, a
            backslash, or a NUL byte.
    """
    bad = ("is not a string" if not isinstance(rel, str) else
           "is empty" if not rel else
           "is absolute" if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).anchor else
           "contains a backslash or NUL" if "\\" in rel or "\0" in rel else
           "leaves the bundle (..)" if ".." in PurePosixPath(rel).parts else
           "is not normalised" if rel != PurePosixPath(rel).as_posix() or "." in rel.split("/") else "")
    if bad:
        raise BundleError(f"{MANIFEST}: {where} = {rel!r} {bad}; a bundle names only relative paths inside "
                          f"its directory. Refusing to open it; {REEXPORT}")
    return rel  # type: ignore[return-value]


def member_path(root: Path, rel: str, where: str) -> Path:
    """The file ``root/rel`` after checking that it resolves inside ``root`` (symlinks resolved).

    Raises:
        BundleError: a bad name (:func:`check_member_name`), or a path whose resolved target is outside
            the bundle directory (a symlink escape).
    """
    check_member_name(rel, where)
    path = root / rel
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise BundleError(f"{root / MANIFEST}: {where} = {rel!r} resolves to {str(target)!r}, outside the bundle "
                          f"(a symlink escape). Refusing to open it; {REEXPORT}")
    return path
