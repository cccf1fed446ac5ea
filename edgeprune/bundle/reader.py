"""Open and verify a bundle (format: :mod:`edgeprune.bundle.format`), torch-free: the runtime's only way in.

A bundle is untrusted input. The runtime refuses one it cannot trust, with one line that says which file or
field and what to do: no ``manifest.json``, an unknown format version, a manifest that fails its schema
(:mod:`~edgeprune.bundle.schema`), a path outside the bundle or not hashed, a missing, unreadable or modified
file, a manifest that contradicts what its graphs were exported for (:mod:`~edgeprune.bundle.integrity`), or a
request (``--method``, ``--tokens``, ``--ratio``, ``--method-arg``) that contradicts what was exported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import BackendError, BundleError
from .format import FORMAT, FORMAT_VERSION, MANIFEST, OLD_TAG, REEXPORT as _REEXPORT, member_path
from .integrity import check_confined, check_records, verify_files
from .schema import validate_manifest
from .spec import GraphSpec


@dataclass(frozen=True)
class GraphEntry:
    """One graph of a bundle: its spec and the path of its ONNX file (sidecars sit next to it).

    Attributes:
        variants: other ONNX files of the same graph (same spec and weights), by consumer: ``ort`` is the
            decoder with fused attention (:mod:`edgeprune.export.ort_variant` writes it).
    """

    name: str
    path: Path
    spec: GraphSpec
    variants: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory and its parsed manifest.

    Attributes:
        root: the bundle directory.
        manifest: the parsed ``manifest.json``.
        graphs: graph name -> :class:`GraphEntry` (``vision``, ``embed``, ``decoder``, and ``prune`` when the
            method has a prune graph).
    """

    root: Path
    manifest: dict[str, Any]
    graphs: dict[str, GraphEntry]

    @property
    def method(self) -> dict[str, Any]:
        return self.manifest["method"]

    @property
    def k(self) -> int | None:
        """The static budget K, None for ``none`` (every token kept)."""
        return self.method.get("k")

    def path(self, rel: str) -> Path:
        """The hashed file ``rel`` of the bundle (confined to the root; every path a reader opens goes here).

        Raises:
            BundleError: ``rel`` is not listed in ``files`` or resolves outside the bundle.
        """
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.root / MANIFEST}: {rel!r} is not one of the bundle's hashed files; {_REEXPORT}")
        return member_path(self.root, rel, repr(rel))

    def check_request(self, method: str | None = None, tokens: int | None = None, ratio: float | None = None,
                      method_args: Mapping[str, str] | None = None) -> None:
        """Refuse flags that contradict the exported method and budget (the bundle fixes both).

        Args:
            method, tokens, ratio, method_args: what the user asked for; None / empty means "take the bundle's".
        Raises:
            BackendError: a mismatch; the message gives the exported value and how to get the other one.
        """
        m = self.method
        hint = "export another bundle for a different method or budget"
        if method is not None and method != m["name"]:
            raise BackendError(f"the bundle {self.root} was exported for --method {m['name']}, not {method}; {hint}")
        if m.get("k") is None and (tokens is not None or ratio is not None):
            raise BackendError(f"the bundle {self.root} keeps every visual token (method {m['name']}); drop "
                               f"--tokens/--ratio or {hint}")
        if tokens is not None and tokens != m.get("k"):
            raise BackendError(f"the bundle {self.root} has a static budget K = {m.get('k')} ({m['name']}), not "
                               f"--tokens {tokens}; {hint}")
        if ratio is not None:
            n = m.get("n")
            k = None if n is None else max(1, int(round(ratio * n)))
            if k is None or k != m.get("k"):
                raise BackendError(f"--ratio {ratio} does not give the bundle's static K = {m.get('k')} "
                                   f"(N = {n if n is not None else 'depends on the image'}); {hint}")
        if method_args:
            from ..methods.registry import get_method_class

            asked = get_method_class(m["name"]).from_args(method_args).describe_params()
            wrong = {key: (asked[key], m["params"].get(key)) for key in method_args
                     if asked[key] != m["params"].get(key)}
            if wrong:
                desc = ", ".join(f"{key}={a!r} (exported: {b!r})" for key, (a, b) in wrong.items())
                raise BackendError(f"the bundle {self.root} was exported with other method arguments: {desc}; {hint}")


def _read_manifest(root: Path) -> dict[str, Any]:
    """Read and parse ``manifest.json``, check format and version, validate it against the schema."""
    path = root / MANIFEST
    if not root.is_dir():
        aside = sorted(root.absolute().parent.glob(f".{root.name}{OLD_TAG}*/bundle"))
        if aside:  # an `export --force` was killed between its two renames (edgeprune.export.atomic)
            raise BundleError(f"bundle directory {str(root)!r} does not exist: an export replacing it was interrupted "
                              f"and the previous bundle is at {str(aside[-1])!r}; run the export again (it moves "
                              "the previous bundle back first) or move that directory back yourself")
        raise BundleError(f"bundle directory {str(root)!r} does not exist; create it with `edgeprune export`")
    if not path.is_file():
        raise BundleError(f"{str(root)!r} is not an edgeprune bundle: it has no {MANIFEST}; create it with "
                          "`edgeprune export --model M --method X --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise BundleError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); {_REEXPORT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not an edgeprune bundle manifest (format {FORMAT!r} expected)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format version {version!r}; this edgeprune reads version "
                          f"{FORMAT_VERSION}. Use the edgeprune that wrote it, or {_REEXPORT}")
    validate_manifest(manifest, str(path))
    return manifest


def open_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Read ``root/manifest.json``, validate it and (by default) verify every file's sha256.

    Checks, in order (:mod:`edgeprune.bundle.integrity`): schema; confinement of every listed and referenced
    path; sha256 of every file (``verify``); each graph file's export record against the manifest.

    Args:
        root: the bundle directory.
        verify: hash every file (reads the whole bundle once; pass False only for a bundle just verified).
            Schema, confinement and export records are checked either way.
    Returns:
        The :class:`Bundle`.
    Raises:
        BundleError: see the module docstring.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    check_confined(root, manifest)
    if verify:
        verify_files(root, manifest["files"])
    check_records(root, manifest)
    graphs: dict[str, GraphEntry] = {}
    for name, entry in manifest["graphs"].items():
        try:
            spec = GraphSpec.from_dict(entry["spec"])
        except ValueError as exc:
            raise BundleError(f"{root / MANIFEST}: graphs.{name}.spec is malformed ({exc}); {_REEXPORT}") from None
        variants = {key: root / v["file"] for key, v in (entry.get("variants") or {}).items()}
        graphs[name] = GraphEntry(name=name, path=root / entry["file"], spec=spec, variants=variants)
    _check_method_graphs(root, manifest["method"], graphs)
    return Bundle(root=root, manifest=manifest, graphs=graphs)


def _check_method_graphs(root: Path, method: Mapping[str, Any], graphs: Mapping[str, GraphEntry]) -> None:
    """The manifest is not hashed (it holds the hashes): at least keep its method consistent with the graphs.

    Pre-LLM: K equals the prune graph's static K (no prune graph for ``none``). In-LLM: a prefill graph exists
    (its K, FastV's, is baked in and recorded in the manifest's ``in_llm`` section).

    Raises:
        BundleError: an inconsistency (names the manifest and what to do).
    """
    if method.get("placement") == "in_llm":
        if "prefill" not in graphs:
            raise BundleError(f"{root / MANIFEST} is for the in-LLM method {method.get('name')} but lists no "
                              f"'prefill' graph; {_REEXPORT}")
        return
    k = method.get("k")
    prune_k = graphs["prune"].spec.outputs[-1].dims[-1] if "prune" in graphs else None
    if k != prune_k:
        raise BundleError(f"{root / MANIFEST} says K = {k} but its prune graph keeps {prune_k}; {_REEXPORT}")
