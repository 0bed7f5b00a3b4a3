"""Parity with Hugging Face GPT-2, the llm.c way.

``scripts/make_reference.py`` ran a tiny seeded GPT-2 in PyTorch once and stored its inputs,
logits, loss, every gradient and greedy ids. These tests load the same weights through
``load_hf_gpt2`` and compare tensor by tensor; nothing here is computed by jaxgpt and then
compared with itself.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from scripts_loader import load_script

from jaxgpt.generation import generate
from jaxgpt.loss import cross_entropy
from jaxgpt.model import GPTModel
from jaxgpt.weights import load_hf_gpt2, params_from_hf, params_to_hf

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODEL_DIR = FIXTURES / "hf_tiny"
REFERENCE = FIXTURES / "hf_tiny_reference.npz"

LOGITS_ATOL = 1e-5
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-5  # max|diff| <= GRAD_RTOL * max(1, max|ref|), per tensor


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module", params=[1, 96], ids=["vocab_512", "vocab_padded_576"])
def model(request):
    """The reference weights as they load, and loaded into a model whose vocabulary is padded
    (``vocab_pad_multiple``): every parity test below holds for both."""
    cfg, params = load_hf_gpt2(MODEL_DIR)
    if request.param > 1:
        cfg = cfg.replace(vocab_pad_multiple=request.param)
        params = params_from_hf(params_to_hf(params, cfg.replace(vocab_pad_multiple=1)), cfg)
        assert params["tok_emb"]["embedding"].shape[0] == 576  # real padding, not a no-op
    return cfg, params


def _loss_fn(cfg, input_ids, targets):
    def loss(params):
        logits = GPTModel(cfg).apply({"params": params}, input_ids, deterministic=True)
        return cross_entropy(logits, targets)

    return loss


def test_fixture_config_is_the_tiny_tied_gpt2(model):
    cfg, _ = model
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (512, 32, 32, 4, 2)
    assert cfg.qkv_bias and cfg.tie_embeddings


def test_logits_match_reference(model, ref):
    cfg, params = model
    with jax.default_matmul_precision("float32"):
        logits = np.asarray(GPTModel(cfg).apply({"params": params}, ref["input_ids"], deterministic=True))
    assert logits.shape == ref["logits"].shape
    diff = float(np.abs(logits - ref["logits"]).max())
    assert diff <= LOGITS_ATOL, f"logits: max |diff| {diff:.3g} > {LOGITS_ATOL}"


def test_loss_matches_reference(model, ref):
    cfg, params = model
    with jax.default_matmul_precision("float32"):
        loss = float(_loss_fn(cfg, ref["input_ids"], ref["targets"])(params))
    diff = abs(loss - float(ref["loss"]))
    assert diff <= LOSS_ATOL, f"loss: jaxgpt {loss:.8f}, reference {float(ref['loss']):.8f}, diff {diff:.3g}"


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_every_gradient_matches_reference(model, ref, jit):
    cfg, params = model
    grad_fn = jax.grad(_loss_fn(cfg, ref["input_ids"], ref["targets"]))
    if jit:
        grad_fn = jax.jit(grad_fn)
    with jax.default_matmul_precision("float32"):
        grads = grad_fn(params)
    padding = np.asarray(grads["tok_emb"]["embedding"])[cfg.vocab_size :]
    assert not padding.any(), "padding rows of the vocabulary got a gradient"
    grads = params_to_hf(grads, cfg)  # HF names; the tied wte gets both contributions
    ref_names = sorted(name.removeprefix("grad/") for name in ref if name.startswith("grad/"))
    assert sorted(grads) == ref_names

    failures = []
    for name in ref_names:
        expected, got = ref[f"grad/{name}"], grads[name]
        assert got.shape == expected.shape, f"{name}: shape {got.shape} vs reference {expected.shape}"
        diff = float(np.abs(got - expected).max())
        bound = GRAD_RTOL * max(1.0, float(np.abs(expected).max()))
        if not diff <= bound:
            failures.append(f"{name}: max |diff| {diff:.3g} > {bound:.3g}")
    assert not failures, "gradients differ from the reference:\n" + "\n".join(failures)


@pytest.mark.parametrize("case", ["greedy", "greedy_crop"], ids=["within_context", "cropped_context"])
def test_greedy_ids_match_reference(model, ref, case):
    cfg, params = model
    prompt, expected = ref[f"{case}_prompt"], ref[f"{case}_ids"]
    if case == "greedy_crop":
        assert expected.shape[1] > cfg.context_length  # the reference really had to crop
    with jax.default_matmul_precision("float32"):
        ids = np.asarray(generate(params, cfg, prompt, expected.shape[1] - prompt.shape[1]))
    assert ids.shape == expected.shape
    mismatch = np.argwhere(ids != expected)
    assert mismatch.size == 0, f"first mismatch at (row, pos) {tuple(mismatch[0])}:\n{ids}\nvs\n{expected}"


def _parity_bound(name: str, expected: np.ndarray) -> float:
    """The largest |difference| the parity tests above accept for the reference tensor ``name``."""
    if np.issubdtype(expected.dtype, np.integer):
        return 0.0  # token ids: exact
    if name.startswith("grad/"):
        return GRAD_RTOL * max(1.0, float(np.abs(expected).max()))
    return {"logits": LOGITS_ATOL, "loss": LOSS_ATOL}[name]


def test_reference_regenerates_identically(tmp_path, ref):
    """Rebuilding the reference in process gives the committed fixture, so it cannot drift.

    The weights are drawn by NumPy and must match bit for bit. The outputs come from this
    machine's PyTorch float kernels, which sum in another order on another CPU: they must agree
    with the fixture as closely as jaxgpt must agree with it, not to the last bit.
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    make_reference = load_script("make_reference")

    fresh = make_reference.build_reference(tmp_path)
    assert sorted(fresh) == sorted(ref)
    failures = []
    for name, expected in ref.items():
        assert fresh[name].shape == expected.shape, f"{name}: shape {fresh[name].shape} vs {expected.shape}"
        diff = float(np.abs(fresh[name].astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
        bound = _parity_bound(name, expected)
        if not diff <= bound:
            failures.append(f"{name}: max |diff| {diff:.3g} > {bound:.3g}")
    assert not failures, "the regenerated reference differs from the fixture:\n" + "\n".join(failures)

    committed = load_file(MODEL_DIR / "model.safetensors")
    rebuilt = load_file(tmp_path / "hf_tiny" / "model.safetensors")
    assert sorted(rebuilt) == sorted(committed)
    for name, expected in committed.items():
        np.testing.assert_array_equal(rebuilt[name], expected, err_msg=name)
