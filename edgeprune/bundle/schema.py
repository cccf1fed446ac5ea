"""The manifest's schema (JSON Schema, draft 2020-12) and its validation: one clean error naming the JSON path.

A bundle is untrusted input (a file a user downloads or copies onto a robot): before any field is read, the
whole manifest is validated here, so a wrong type anywhere (``files`` as a list, ``prompt: {}``,
``max_positions: "abc"``, ``vision: "x"``, ``method: null``) is one ``error:`` line such as
``manifest.json: $.max_positions: 'abc' is not of type 'integer'``, never a traceback further down.

Shape rules: the top level admits only the known sections (:data:`REQUIRED` plus the optional ``guidance``,
``engines`` and ``weights``); every field a reader uses is typed; sections that are records for people
(``model``, ``libraries``, a graph entry's export statistics) may carry extra keys. Path *values* (which file
is opened) are checked by :mod:`edgeprune.bundle.reader` against ``files`` and the bundle root, not here.

Optional sections other parts of edgeprune write (documented in ``docs/bundle-format.md``):

- ``engines`` (``edgeprune build``, :mod:`edgeprune.engines.build`): one entry per
  ``<flavour>-<version>-sm<cc>`` with its directory under ``engines/``, builder settings, plugin modes, build
  seconds and one record per graph (plan ``file`` + ``sha256``, profiles, plugin layers). Plan files are
  hashed in ``files`` like every other file and confined to ``engines/``.
- ``weights`` (``edgeprune export --weights``, :mod:`edgeprune.export.quantize`): the weight-only quantization
  scheme (``scheme`` int4/int8, ``bits``, ``block_size``, ``method``, ...) and the graphs/files it applies to;
  each quantized LLM graph entry carries the same record under ``graphs.<name>.weights``.

``jsonschema`` is imported when a manifest is validated (a runtime dependency: ``pip install edgeprune``).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import BundleError
from .format import FORMAT, MANIFEST, REEXPORT, REQUIRED

_INT = {"type": "integer"}
_POS = {"type": "integer", "minimum": 1}
_NAT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_NSTR = {"type": "string", "minLength": 1}
_BOOL = {"type": "boolean"}
_NUM = {"type": "number"}
_OPT_INT = {"type": ["integer", "null"]}
_OPT_STR = {"type": ["string", "null"]}
_STRS = {"type": "array", "items": _NSTR}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}


def _obj(props: Mapping[str, Any], required: tuple[str, ...] = (), extra: bool = True) -> dict[str, Any]:
    return {"type": "object", "properties": dict(props), "required": list(required), "additionalProperties": extra}


_TENSOR = _obj({"name": _NSTR, "dtype": {"enum": ["float32", "float16", "int64", "int32", "bool"]},
                "dims": {"type": "array", "items": {"type": ["integer", "string"]}}},
               ("name", "dtype", "dims"), extra=False)
_SPEC = _obj({"name": _NSTR, "inputs": {"type": "array", "items": _TENSOR},
              "outputs": {"type": "array", "items": _TENSOR, "minItems": 1}}, ("name", "inputs", "outputs"), extra=False)
# weight-only quantization record (export --weights); the same shape at the top level adds graphs/files
_WEIGHTS = _obj({"scheme": {"enum": ["int4", "int8"]}, "bits": _POS, "block_size": _POS, "method": _NSTR,
                 "format": _STR, "accuracy_level": _INT, "symmetric": _BOOL, "graphs": _STRS, "files": _STRS},
                ("scheme", "block_size", "method"))
_VARIANT = _obj({"file": _NSTR, "opset": _POS, "data_files": _STRS, "max_abs_err": _NUM, "purpose": _STR}, ("file",))
_GRAPH = _obj({"file": _NSTR, "files": _STRS, "spec": _SPEC, "max_abs_err": _NUM,
               "validated_on": {"type": "array", "items": {"type": "object", "additionalProperties": _INT}},
               "variants": {"type": "object", "additionalProperties": _VARIANT},
               "variants_skipped": {"type": "object", "additionalProperties": _STR},
               "export_seconds": _NUM, "reused_from": _STR, "clip_fingerprint": _OPT_STR,
               "num_zones": _POS, "num_groups": _POS, "fused_op": _STR, "in_llm": {"type": "object"},
               "weights": _WEIGHTS}, ("file", "spec"))
_IN_LLM = {"oneOf": [
    {"type": "null"},
    _obj({"kind": {"const": "fastv"}, "layer": _NAT, "keep": _POS}, ("kind", "layer", "keep"), extra=False),
    _obj({"kind": {"const": "fitprune"}, "drops": {"type": "array", "items": _NAT}, "n_ref": _POS},
         ("kind", "drops", "n_ref"), extra=False)]}
_METHOD = _obj({"name": _NSTR, "params": {"type": "object"}, "positions": {"enum": ["compact", "original"]},
                "placement": {"enum": ["pre_llm", "in_llm"]}, "uses_budget": _BOOL, "k": {"type": ["integer", "null"],
                "minimum": 1}, "n": {"type": ["integer", "null"], "minimum": 1}, "n_max": _POS,
                "lowering": _OPT_STR, "guidance": {"enum": ["clip", "llm", None]}, "fused_op": _OPT_STR,
                "in_llm": _IN_LLM},
               ("name", "params", "positions", "placement", "k", "n"))
_GUIDANCE = {"oneOf": [
    {"type": "null"},
    _obj({"source": {"const": "llm"}, "empty_token_id": _NAT}, ("source", "empty_token_id")),
    _obj({"source": {"const": "clip"}, "clip": _STR, "fingerprint": _OPT_STR, "tokenizer": _NSTR, "context": _POS,
          "bos_token_id": _OPT_INT, "eos_token_id": _NAT}, ("source", "tokenizer", "context", "eos_token_id"))]}
_ENGINE_GRAPH = _obj({"file": _NSTR, "sha256": _SHA, "bytes": _NAT, "profiles": {"type": "array"},
                      "plugin_layers": _STRS, "warnings": _NAT, "parse_s": _NUM, "build_s": _NUM}, ("file", "sha256"))
_ENGINE = _obj({"dir": _NSTR, "flavour": _NSTR, "version": _NSTR, "compute_capability": _POS, "precision": _STR,
                "strongly_typed": _BOOL, "build_seconds": _NUM, "plugins": {"type": "object"},
                "graphs": {"type": "object", "additionalProperties": _ENGINE_GRAPH}}, ("dir", "graphs"))

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": list(REQUIRED),
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT},
        "format_version": _POS,
        "model": _obj({"name": _NSTR, "family": _STR, "model_type": _STR, "source": _STR, "dtype": _STR,
                       "fingerprint": _STR, "hidden_size": _POS, "num_layers": _POS, "num_kv_heads": _POS,
                       "head_dim": _POS, "vocab_size": _POS}, ("name",)),
        "method": _METHOD,
        "graphs": {"type": "object", "additionalProperties": _GRAPH, "required": ["vision", "embed", "decoder"]},
        "guidance": _GUIDANCE,
        "preprocessing": {"type": "object"},  # ImageConfig.from_dict checks its keys and values
        "prompt": _obj({"template": {"type": "string", "pattern": "\\{prompt\\}"}, "image_token_id": _NAT,
                        "bos_token_id": _OPT_INT, "eos_token_id": _OPT_INT}, ("template", "image_token_id")),
        "tokenizer": _obj({"file": _NSTR, "files": _STRS, "clean_up_tokenization_spaces": _BOOL}, ("file",)),
        "vision": _obj({"image_size": _POS, "patch_size": _POS, "patches_per_view": _POS,
                        "patch_grid": {"type": "array", "items": _POS, "minItems": 2, "maxItems": 2},
                        "feature_layer": _INT,
                        "grid_pinpoints": {"type": ["array", "null"],
                                           "items": {"type": "array", "items": _POS, "minItems": 2, "maxItems": 2}},
                        "newline_file": _OPT_STR}, ("image_size", "patch_size")),
        "max_positions": _POS,
        "opset": _POS,
        "libraries": {"type": "object", "additionalProperties": _OPT_STR},
        "files": {"type": "object", "additionalProperties": _SHA},
        "engines": {"type": "object", "additionalProperties": _ENGINE},
        "weights": _WEIGHTS,
    },
}


def _path(error: Any) -> str:
    return getattr(error, "json_path", None) or "$" + "".join(f"[{p!r}]" for p in error.absolute_path)


def validate_manifest(manifest: Any, where: str = MANIFEST) -> None:
    """Validate a parsed manifest against :data:`SCHEMA`.

    Args:
        manifest: the parsed JSON; where: the manifest's path, for the message.
    Raises:
        BundleError: one line naming the first offending JSON path (the deepest, most specific error), what
            it is and what was expected.
    """
    from .._deps import require

    jsonschema = require("jsonschema")
    validator = jsonschema.Draft202012Validator(SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is None:
        return
    message = " ".join(str(error.message).split())
    if len(message) > 200:
        message = message[:197] + "..."
    raise BundleError(f"{where}: {_path(error)}: {message}; the manifest is malformed, {REEXPORT}")
