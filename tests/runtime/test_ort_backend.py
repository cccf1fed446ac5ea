"""The ONNX Runtime backend against the torch reference: same kept indices, prefill and decode logits within an
fp32 tolerance, same greedy tokens wherever the top-2 margin exceeds it, for every exported method (GridPrune
with CLIP and LLM guidance, G-Prune, and the in-LLM FastV / FitPrune with the same per-layer visual counts and
ragged cache lengths); torch-free in a subprocess; refuses missing, edited and unknown-version bundles and flags
that contradict the bundle (typed errors, CLI exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeprune.api import build_pipeline
from edgeprune.errors import BackendError
from edgeprune.methods.base import Budget
from edgeprune.runtime.backend import InLLMRequest
from edgeprune.bundle import BundleError, open_bundle
from edgeprune.bundle.format import MANIFEST
from edgeprune.runtime.ort_backend import OrtBackend, TokenizersCodec, build_ort_pipeline, resolve_providers
from edgeprune.runtime.pipeline import position_ids
from edgeprune.runtime.preprocess import default_image, preprocess
from edgeprune.runtime.prompt import split_prompt

PROMPT = "What does the sign say?"
NEW = 6
# Logit tolerance, relative to max(1, max |logit|): ORT and PyTorch differ only by fp32 summation order
# (observed ~1e-6 here); a real bug (mask, positions, splice, cache) moves logits by > 1e-2.
TOL = 1e-4
BUDGETS = {"none": None, "cls-topk": 64, "uniform": 100, "random": 50}
# The methods with fused-op prune graphs or in-LLM decoders: name -> (method, K, method args).
METHODS = {"gridprune": ("gridprune", 64, {}), "gridprune-llm": ("gridprune", 64, {"guidance": "llm"}),
           "gprune": ("gprune", 64, {}), "fastv": ("fastv", 64, {}), "fitprune": ("fitprune", None, "recipe")}
IN_LLM = ("fastv", "fitprune")  # their prefill/ragged-decoder exports take ~40 s each: `pytest -m slow`


def params(names):
    """Parametrize over method names, marking the in-LLM ones slow (run by CI's `pytest -m slow`)."""
    return [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in IN_LLM else []) for n in names]


RECIPE_DROPS = (100, 200, 0, 50)  # tests/conftest.py's recipe for the 4-layer tiny models (fitted at N = 576)


def bundle_dir(get, loaded, method, tokens=None, reuse=None, method_args=None):
    """The session's bundle (``get`` is the ``exported_bundle`` factory of tests/conftest.py: one export per
    model, method, K and arguments, shared with the other test files); ``reuse``: the bundle whose model graphs
    it reuses (default: the model's cls-topk K=64 bundle)."""
    return get(loaded, method, tokens, method_args, reuse=reuse or True)


def method_bundle(get, loaded, name, reuse):
    """The bundle of ``METHODS[name]``; returns (root, method, K, method args as strings)."""
    method, k, args = METHODS[name]
    if args == "recipe":
        args = {"recipe": str(get.recipe)}  # drops RECIPE_DROPS
    k = k if loaded.name == "tiny-llava" or k is None else 160
    return bundle_dir(get, loaded, method, k, reuse, args), method, k, args


@pytest.fixture(scope="module")
def bundles(exported_bundle, tiny_llava):
    cls = bundle_dir(exported_bundle, tiny_llava, "cls-topk", 64)
    return {"cls-topk": cls, "none": bundle_dir(exported_bundle, tiny_llava, "none", reuse=cls),
            "uniform": bundle_dir(exported_bundle, tiny_llava, "uniform", 100, reuse=cls),
            "random": bundle_dir(exported_bundle, tiny_llava, "random", 50, reuse=cls)}


def run_stages(backend, image, k, positions, force=None, in_llm=None):
    """Drive a backend's stages like the pipeline; greedy on its own logits unless ``force`` gives the tokens.

    ``in_llm``: the Budget of an in-LLM method (every visual token is spliced, the prefill drops them)."""
    pix, size = preprocess(image, backend.image_config)
    before, after = split_prompt(backend.template, PROMPT)
    prefix, suffix = backend.codec.encode(before, True), backend.codec.encode(after, False)
    stats = {}
    with torch.inference_mode():
        visual = backend.encode_image(pix, size)
        if in_llm is not None:
            kept = np.arange(visual.n)
        else:
            guidance = backend.guidance(PROMPT) if backend.needs_guidance else None
            kept = backend.select(visual, k or visual.n, guidance)
        embeds, kept_pos = backend.splice(prefix, visual, kept, suffix)
        pos = position_ids(len(prefix), visual.total, len(suffix), kept_pos, positions)
        request = None if in_llm is None else InLLMRequest(in_llm, len(prefix))
        logits, tokens = [backend.prefill(embeds, pos, request)], []
        if in_llm is not None:
            stats = backend.in_llm_stats()
            kept = stats["kept"]
        for step in range(NEW):
            tokens.append(int(np.argmax(logits[-1])) if force is None else force[step])
            if step + 1 < NEW:
                logits.append(backend.decode(tokens[-1], int(pos[-1]) + 1 + step))
    return {"kept": np.asarray(kept), "logits": logits, "tokens": tokens, "prompt": (prefix, suffix), "stats": stats}


def assert_parity(ort_backend, torch_backend, image, k, positions, in_llm=None):
    """Kept indices equal; every step's logits within TOL; equal greedy tokens where the margin exceeds it; for
    in-LLM methods the same visual tokens per layer and the same per-layer cache lengths."""
    got = run_stages(ort_backend, image, k, positions, in_llm=in_llm)
    ref = run_stages(torch_backend, image, k, positions, force=got["tokens"], in_llm=in_llm)  # teacher-forced
    assert got["prompt"] == ref["prompt"]
    assert np.array_equal(got["kept"], ref["kept"])
    if in_llm is not None:
        for key in ("layer_tokens", "cache_lengths"):
            assert got["stats"][key] == ref["stats"][key], key
    decided = 0
    for step, (lo, lt) in enumerate(zip(got["logits"], ref["logits"])):
        scale = max(1.0, float(np.abs(lt).max()))
        assert float(np.abs(lo - lt).max()) <= TOL * scale, step
        top2 = np.sort(lt)[-2:]
        if top2[1] - top2[0] > 2 * TOL * scale:
            assert int(np.argmax(lt)) == got["tokens"][step], step
            decided += 1
    assert decided >= NEW // 2  # the token check is not vacuous


@pytest.mark.parametrize("method", list(BUDGETS))
def test_ort_matches_torch_reference(method, bundles, tiny_llava, rgb_image):
    be = OrtBackend(bundles[method])
    ref = build_pipeline("", method, tokens=BUDGETS[method], loaded=tiny_llava).backend
    assert_parity(be, ref, rgb_image, BUDGETS[method], be.bundle.method["positions"])


@pytest.mark.parametrize("decoder,file", [("auto", "decoder.ort.onnx"), ("portable", "decoder.onnx")])
def test_both_decoder_files_match_torch(decoder, file, bundles, tiny_llava, rgb_image):
    """The fused-attention variant (what ``auto`` picks on the CPU) and the portable opset-18 decoder (what
    TensorRT builds) both pass the full parity check."""
    be = OrtBackend(bundles["cls-topk"], decoder=decoder)
    assert be.runners["decoder"].path.name == file and be.info["graph_files"].endswith(file)
    ref = build_pipeline("", "cls-topk", tokens=64, loaded=tiny_llava).backend
    assert_parity(be, ref, rgb_image, 64, "compact")


def test_decoder_choice_by_provider_and_fallbacks(bundles, tmp_path, caplog, capsys):
    from edgeprune.cli import main
    from edgeprune.bundle.format import sha256_file
    from edgeprune.runtime.ort_backend import choose_graph_file

    entry = open_bundle(bundles["cls-topk"]).graphs["decoder"]
    cpu, gpu = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_graph_file(entry, cpu)[0].name == "decoder.ort.onnx"
    path, why = choose_graph_file(entry, gpu)  # opset-23 Attention may fall back to the CPU there
    assert path.name == "decoder.onnx" and "CUDAExecutionProvider may not run" in why
    assert choose_graph_file(entry, gpu, "fused") == (entry.variants["ort"], "--ort-decoder fused")
    assert choose_graph_file(entry, cpu, "portable")[0] == entry.path
    with pytest.raises(BackendError, match="--ort-decoder must be one of"):
        choose_graph_file(entry, cpu, "fast")
    # an onnxruntime that cannot load the variant (simulated: unreadable file, hashes updated): auto falls back
    root = tmp_path / "b"
    shutil.copytree(bundles["cls-topk"], root)
    import onnx  # a well-formed graph with its export record, but an opset this onnxruntime does not know

    variant = onnx.load(str(root / "decoder.ort.onnx"), load_external_data=False)
    next(o for o in variant.opset_import if o.domain in ("", "ai.onnx")).version = 99
    onnx.save(variant, str(root / "decoder.ort.onnx"))
    m = json.loads((root / MANIFEST).read_text())
    m["files"]["decoder.ort.onnx"] = sha256_file(root / "decoder.ort.onnx")
    (root / MANIFEST).write_text(json.dumps(m))
    with caplog.at_level("WARNING"):
        assert OrtBackend(root).runners["decoder"].path.name == "decoder.onnx"
    assert "running the portable decoder.onnx instead" in caplog.text
    with pytest.raises(BundleError, match="cannot load decoder.ort.onnx"):
        OrtBackend(root, decoder="fused")
    # a bundle without the variant: fused is refused with what to do; an unhashed variant is refused
    del m["graphs"]["decoder"]["variants"]
    (root / MANIFEST).write_text(json.dumps(m))
    assert main(["run", "--bundle", str(root), "--ort-decoder", "fused", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "no fused-attention decoder" in err and err.count("\n") == 1
    m["graphs"]["decoder"]["variants"] = {"ort": {"file": "other.onnx"}}
    (root / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="variants.ort.file = 'other.onnx' is not listed with its sha256"):
        open_bundle(root)


def reuse_for(factory, loaded, name, base):
    """The bundle whose model graphs a method bundle reuses: FitPrune takes FastV's ragged decoder."""
    return method_bundle(factory, loaded, "fastv", base)[0] if name == "fitprune" else base


@pytest.mark.parametrize("name", params(METHODS))
def test_ort_matches_torch_for_fused_and_in_llm_methods(name, bundles, exported_bundle, tiny_llava, rgb_image):
    """GridPrune (CLIP / LLM guidance) and G-Prune: same kept indices through the fused-op graphs; FastV and
    FitPrune: same survivors, per-layer visual counts and ragged cache lengths, logits within TOL."""
    root, method, k, args = method_bundle(exported_bundle, tiny_llava, name,
                                          reuse_for(exported_bundle, tiny_llava, name, bundles["cls-topk"]))
    be = OrtBackend(root)
    ref = build_pipeline("", method, tokens=k, loaded=tiny_llava, method_args=args).backend
    in_llm = Budget(tokens=k) if be.bundle.method["placement"] == "in_llm" else None
    assert_parity(be, ref, rgb_image, k, be.bundle.method["positions"], in_llm)
    assert be.needs_guidance == (method == "gridprune")
    if name == "gridprune":  # the manifest records the guidance the bundle uses
        assert be.bundle.method["guidance"] == "clip" and be.bundle.manifest["guidance"]["clip"] == "tiny-clip"
        long_question = " ".join(["word"] * 200)  # > 77 CLIP tokens: chunked and averaged on the host
        assert np.allclose(be.guidance(long_question), ref.guidance(long_question).numpy(), atol=1e-5)


@pytest.mark.slow  # the in-LLM bundles (see IN_LLM)
@pytest.mark.parametrize("name", ["fastv", "fitprune"])
def test_in_llm_pipeline_tokens_and_layer_counts_equal_torch(name, bundles, exported_bundle, tiny_llava,
                                                               rgb_image):
    root, method, k, args = method_bundle(exported_bundle, tiny_llava, name,
                                          reuse_for(exported_bundle, tiny_llava, name, bundles["cls-topk"]))
    pipe = build_ort_pipeline(root)
    ref = build_pipeline("", method, tokens=k, loaded=tiny_llava, method_args=args)
    pipe.backend.eos_token_id = ref.backend.eos_token_id = None
    got, want = pipe.run(rgb_image, PROMPT, max_new_tokens=NEW), ref.run(rgb_image, PROMPT, max_new_tokens=NEW)
    assert got.tokens == want.tokens and got.kept.tolist() == want.kept.tolist()
    for key in ("layer_tokens", "cache_lengths", "visual_kept", "visual_to_llm", "prompt_tokens"):
        assert got.profile.counters[key] == want.profile.counters[key], key
    lengths = got.profile.counters["cache_lengths"]
    assert len(set(lengths)) > 1  # the cache is ragged
    if name == "fitprune":
        assert got.profile.counters["layer_tokens"][1] == 576 - RECIPE_DROPS[0]


def test_pipeline_tokens_and_kept_equal_torch(bundles, tiny_llava, rgb_image):
    pipe = build_ort_pipeline(bundles["cls-topk"])
    ref = build_pipeline("", "cls-topk", tokens=64, loaded=tiny_llava)
    pipe.backend.eos_token_id = ref.backend.eos_token_id = None
    got, want = pipe.run(rgb_image, PROMPT, max_new_tokens=NEW), ref.run(rgb_image, PROMPT, max_new_tokens=NEW)
    assert got.tokens == want.tokens and got.kept.tolist() == want.kept.tolist() and got.text == want.text
    assert got.profile.counters["backend"] == "ort" and got.profile.counters["visual_to_llm"] == 64
    assert got.profile.counters["providers"] == "CPUExecutionProvider"  # the profile says what ran where
    assert got.profile.counters["graph_files"] == "vision.onnx,prune.onnx,embed.onnx,decoder.ort.onnx"
    assert {k: want.profile.counters[k] for k in ("device", "dtype", "attention")} == {
        "device": "cpu", "dtype": "float32", "attention": "sdpa"}
    again = pipe.run(rgb_image, PROMPT, max_new_tokens=NEW)  # sessions and cache state are reused cleanly
    assert again.tokens == got.tokens


@pytest.mark.parametrize("name", params(["cls-topk", "gridprune", "fitprune"]))
def test_runtime_path_imports_neither_torch_nor_transformers(name, bundles, exported_bundle, tiny_llava):
    """The guidance stage (CLIP tokenizer + text graph) and the ragged in-LLM cache need no torch either."""
    root, method, k, args = (bundles["cls-topk"], "cls-topk", 64, {}) if name == "cls-topk" else method_bundle(
        exported_bundle, tiny_llava, name, reuse_for(exported_bundle, tiny_llava, name, bundles["cls-topk"]))
    code = ("import json, sys\nfrom edgeprune.cli import main\n"
            f"rc = main(['run', '--bundle', {str(root)!r}, '--max-new-tokens', '4', '--json', "
            f"'--prompt', {PROMPT!r}])\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print('heavy modules:', heavy, file=sys.stderr)\nsys.exit(rc or (3 if heavy else 0))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    want = build_pipeline("", method, tokens=k, loaded=tiny_llava, method_args=args).run(default_image(), PROMPT,
                                                                                         max_new_tokens=4)
    assert res["kept"] == want.kept.tolist() and res["tokens"] == want.tokens


def test_codec_matches_the_hf_tokenizer(bundles, tiny_llava):
    m = open_bundle(bundles["none"]).manifest
    codec = TokenizersCodec(bundles["none"] / m["tokenizer"]["file"])
    hf = tiny_llava.tokenizer
    for text in (m["prompt"]["template"].replace("{prompt}", PROMPT), " ASSISTANT:", "héllo, wörld! 123"):
        for bos in (True, False):
            assert codec.encode(text, bos) == list(hf(text, add_special_tokens=bos).input_ids)
    ids = list(np.random.default_rng(0).integers(0, 1024, 40)) + [1, 2]
    assert codec.decode(ids) == hf.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------- refusals
def test_spec_checks_and_static_k(bundles, rgb_image):
    be = OrtBackend(bundles["cls-topk"])
    with pytest.raises(BackendError, match="expects int64"):
        be.runners["embed"].infer({"input_ids": np.zeros((1, 3), np.int32)})
    pix, size = preprocess(rgb_image, be.image_config)
    with pytest.raises(BackendError, match="static K = 64"):
        be.select(be.encode_image(pix, size), 32)
    with pytest.raises(BackendError, match="unknown execution provider"):
        resolve_providers(["tpu"])
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]


def _corrupt(root, how):
    m = json.loads((root / MANIFEST).read_text())
    if how == "missing":
        (root / "decoder.onnx.data").unlink()
        return "decoder.onnx.data is missing"
    if how == "edited":
        data = bytearray((root / "embed.onnx.data").read_bytes())
        data[100] ^= 1
        (root / "embed.onnx.data").write_bytes(bytes(data))
        return "embed.onnx.data does not match its sha256"
    if how == "version":
        m["format_version"] = 99
        (root / MANIFEST).write_text(json.dumps(m))
        return "format version 99"
    (root / MANIFEST).unlink()
    return "no manifest.json"


@pytest.mark.parametrize("how", ["missing", "edited", "version", "no-manifest"])
def test_bad_bundles_are_refused(how, bundles, tmp_path, capsys):
    from edgeprune.cli import main

    root = tmp_path / "b"
    shutil.copytree(bundles["uniform"], root)
    match = _corrupt(root, how)
    with pytest.raises(BundleError, match=match):
        OrtBackend(root)
    assert main(["run", "--bundle", str(root), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    if how in ("missing", "edited"):
        assert "re-export" in err


@pytest.mark.parametrize("argv,match", [
    (["--method", "uniform"], "exported for --method cls-topk"), (["--tokens", "32"], "static budget K = 64"),
    (["--ratio", "0.5"], "does not give the bundle's static K = 64"),
    (["--method-arg", "positions=original"], "other method arguments"),
    (["--model", "tiny-llava"], "exclude each other"), (["--backend", "torch"], "runs on --backend ort"),
    (["--providers", "tpu"], "unknown execution provider")])
def test_flags_that_contradict_the_bundle(argv, match, bundles, capsys):
    from edgeprune.cli import main

    assert main(["run", "--bundle", str(bundles["cls-topk"]), "--max-new-tokens", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_cli_run_bundle_happy_path_and_missing_bundle(bundles, capsys, tmp_path):
    from edgeprune.cli import main

    assert main(["run", "--bundle", str(bundles["cls-topk"]), "--method", "cls-topk", "--tokens", "64",
                 "--max-new-tokens", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["kept"]) == 64 and res["profile"]["counters"]["backend"] == "ort"
    assert main(["run", "--backend", "ort"]) == 2 and "pass --bundle DIR" in capsys.readouterr().err
    assert main(["run", "--bundle", str(tmp_path / "nope")]) == 2 and "does not exist" in capsys.readouterr().err
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main(["run", "--bundle", str(bundles["none"]), "--providers", "cuda"]) == 2
        assert "onnxruntime-gpu" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- LLaVA-NeXT (~90 s: -m "not slow")
@pytest.mark.slow
@pytest.mark.parametrize("method,k", [("cls-topk", 160), ("uniform", 200)])
def test_next_ort_matches_torch_reference(method, k, exported_bundle, tiny_llava_next, rgb_image):
    cls = bundle_dir(exported_bundle, tiny_llava_next, "cls-topk", 160)
    root = cls if method == "cls-topk" else bundle_dir(exported_bundle, tiny_llava_next, method, k, reuse=cls)
    be = OrtBackend(root)
    assert be.bundle.method["n"] is None and be.bundle.manifest["vision"]["newline_file"]
    ref = build_pipeline("", method, tokens=k, loaded=tiny_llava_next).backend
    assert_parity(be, ref, rgb_image, k, be.bundle.method["positions"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gridprune", "gprune", "fastv", "fitprune"])
def test_next_fused_and_in_llm_methods_match_torch(name, exported_bundle, tiny_llava_next, rgb_image):
    """Image-dependent N: zone / group ids from the host layout, K split over the groups in the graph, FastV's
    N - K and FitPrune's rescaled drops as shape arithmetic, newline tokens never dropped."""
    cls = bundle_dir(exported_bundle, tiny_llava_next, "cls-topk", 160)
    root, method, k, args = method_bundle(exported_bundle, tiny_llava_next, name,
                                          reuse_for(exported_bundle, tiny_llava_next, name, cls))
    be = OrtBackend(root)
    ref = build_pipeline("", method, tokens=k, loaded=tiny_llava_next, method_args=args).backend
    in_llm = Budget(tokens=k) if be.bundle.method["placement"] == "in_llm" else None
    assert_parity(be, ref, rgb_image, k, be.bundle.method["positions"], in_llm)
    for size in ((500, 260), (336, 900)):  # other N: the graphs are not specialised to one layout
        image = rgb_image.resize(size[::-1])
        got = run_stages(be, image, k, "original", in_llm=in_llm)
        want = run_stages(ref, image, k, "original", in_llm=in_llm)
        assert np.array_equal(got["kept"], want["kept"]), size
        for key in ("layer_tokens", "cache_lengths"):
            assert got["stats"].get(key) == want["stats"].get(key), (size, key)
