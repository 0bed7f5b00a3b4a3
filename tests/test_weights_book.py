"""The book's PyTorch GPTModel layout: a seeded llms_from_scratch model imported into jaxgpt."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from book_reference import BOOK_CFG
from flax.traverse_util import flatten_dict

from jaxgpt import generate  # the function, whichever module holds it
from jaxgpt.config import PRESETS, GPTConfig
from jaxgpt.model import GPTModel, init_params
from jaxgpt.weights import book_state_dict, load_book_state_dict, save_book_state_dict, save_hf_gpt2


def _cfg(qkv_bias: bool) -> GPTConfig:
    return GPTConfig(**BOOK_CFG, qkv_bias=qkv_bias, tie_embeddings=False)


def _book_model(qkv_bias: bool):
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    torch.manual_seed(123)
    return ch04.GPTModel({**BOOK_CFG, "qkv_bias": qkv_bias}).eval()


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).numpy()


def _jax_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(GPTModel(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)))


IDS = np.random.default_rng(0).integers(0, BOOK_CFG["vocab_size"], (2, 11))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_imported_book_model_gives_the_same_logits_and_greedy_ids(qkv_bias):
    torch = pytest.importorskip("torch")
    generate_text_simple = pytest.importorskip("llms_from_scratch.ch04").generate_text_simple

    model = _book_model(qkv_bias)
    cfg, params = load_book_state_dict(model.state_dict(), cfg=_cfg(qkv_bias).replace(tie_embeddings=True))
    assert cfg == _cfg(qkv_bias)  # the book's separate out_head is kept
    expected = _torch_logits(model, IDS)
    got = _jax_logits(cfg, params, IDS)
    assert np.abs(got - expected).max() <= 1e-5, f"max |logits diff| = {np.abs(got - expected).max():.2e}"

    with torch.no_grad():  # 11 + 9 tokens run past the context of 16: both crop to the last 16
        book_ids = generate_text_simple(model, torch.as_tensor(IDS), max_new_tokens=9, context_size=16)
    np.testing.assert_array_equal(np.asarray(generate(params, cfg, IDS, 9)), book_ids.numpy())


def test_pth_files_and_the_books_checkpoint_dict_load_the_same_params(tmp_path):
    torch = pytest.importorskip("torch")

    model = _book_model(True)
    _, from_dict = load_book_state_dict(model.state_dict(), cfg=_cfg(True))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": {}}, tmp_path / "ckpt.pth")
    for file in ("model.pth", "ckpt.pth"):
        cfg, params = load_book_state_dict(tmp_path / file, cfg=_cfg(True))
        flat, ref = flatten_dict(params), flatten_dict(from_dict)
        assert flat.keys() == ref.keys()
        for path in ref:
            np.testing.assert_array_equal(flat[path], ref[path], err_msg="/".join(path))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_exported_state_dict_loads_strictly_into_the_book_model(tmp_path, qkv_bias):
    torch = pytest.importorskip("torch")
    BookGPTModel = pytest.importorskip("llms_from_scratch.ch04").GPTModel

    cfg = _cfg(qkv_bias)
    params = init_params(cfg, jax.random.key(5))
    save_book_state_dict(cfg, params, tmp_path / "out.pth")
    model = BookGPTModel({**BOOK_CFG, "qkv_bias": qkv_bias}).eval()
    model.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=True)
    np.testing.assert_allclose(_torch_logits(model, IDS), _jax_logits(cfg, params, IDS), atol=1e-5)


def test_book_weights_saved_as_hugging_face_give_the_book_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")

    model = _book_model(False)
    cfg, params = load_book_state_dict(model.state_dict(), cfg=_cfg(False))
    save_hf_gpt2(cfg, params, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(hf_logits, _torch_logits(model, IDS), atol=1e-5)


# --- what needs no torch: config inference and errors ---


@functools.lru_cache
def _cached_state(cfg: GPTConfig) -> dict[str, np.ndarray]:
    return book_state_dict(init_params(cfg, jax.random.key(0)), cfg)


def _numpy_state(cfg: GPTConfig) -> dict[str, np.ndarray]:
    """A book state dict (NumPy) of random params, a fresh dict each call."""
    return dict(_cached_state(cfg))


def test_config_is_read_from_shapes_and_n_heads_from_the_matching_preset():
    small = PRESETS["gpt2-small"]  # emb_dim 768 with 12 heads
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=small.emb_dim, n_heads=small.n_heads, n_layers=1)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    state = book_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes), cfg)
    got, _ = load_book_state_dict(state)
    assert (got.vocab_size, got.context_length, got.emb_dim, got.n_layers) == (50, 8, small.emb_dim, 1)
    assert got.n_heads == small.n_heads and not got.qkv_bias and not got.tie_embeddings


def test_tied_params_export_the_embedding_as_out_head_and_import_untied():
    cfg = _cfg(False).replace(tie_embeddings=True)
    params = init_params(cfg, jax.random.key(1))
    state = book_state_dict(params, cfg)
    np.testing.assert_array_equal(state["out_head.weight"], state["tok_emb.weight"])
    got_cfg, got = load_book_state_dict(state, cfg=cfg)
    np.testing.assert_allclose(_jax_logits(got_cfg, got, IDS), _jax_logits(cfg, params, IDS), atol=1e-5)


def test_unknown_n_heads_asks_for_a_config():
    with pytest.raises(ValueError, match="n_heads.*cfg"):
        load_book_state_dict(_numpy_state(_cfg(False)))


def test_config_contradicting_the_tensors_names_the_field():
    with pytest.raises(ValueError, match=r"emb_dim: cfg 64, tensors 32"):
        load_book_state_dict(_numpy_state(_cfg(False)), cfg=_cfg(False).replace(emb_dim=64))


def test_missing_and_misshapen_tensors_are_named():
    state = _numpy_state(_cfg(False))
    del state["trf_blocks.1.ff.layers.2.weight"]
    with pytest.raises(ValueError, match=r"trf_blocks\.1\.ff\.layers\.2\.weight \(32, 128\)"):
        load_book_state_dict(state, cfg=_cfg(False))
    state = _numpy_state(_cfg(False))
    state["trf_blocks.0.att.W_key.weight"] = state["trf_blocks.0.att.W_key.weight"][:, :8]
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.att\.W_key\.weight.*\(32, 8\).*\(32, 32\)"):
        load_book_state_dict(state, cfg=_cfg(False))


def test_not_a_book_state_dict_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tok_emb.weight"):
        load_book_state_dict({"wte.weight": np.zeros((4, 4))})
    with pytest.raises(FileNotFoundError, match="no PyTorch state dict"):
        load_book_state_dict(tmp_path / "missing.pth")
