import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.generate import generate
from jaxgpt.model import GPTModel, init_params

CFG = GPTConfig(vocab_size=61, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)


def _reference_greedy(params, cfg, ids, n):
    """The book's generate_text_simple, step by step in NumPy around the model."""
    ids = np.asarray(ids)
    for _ in range(n):
        logits = np.asarray(GPTModel(cfg).apply({"params": params}, jnp.asarray(ids[:, -cfg.context_length :])))
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


def test_greedy_generation_crops_to_the_context_and_takes_the_argmax():
    params = init_params(CFG, jax.random.key(3))
    prompt = np.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]], np.int32)
    out = np.asarray(generate(params, CFG, prompt, max_new_tokens=6))  # 11 tokens > context 8
    assert out.shape == (2, 11)
    np.testing.assert_array_equal(out[:, :5], prompt)
    np.testing.assert_array_equal(out, _reference_greedy(params, CFG, prompt, 6))


def test_empty_prompt_is_rejected():
    params = init_params(CFG, jax.random.key(3))
    with pytest.raises(ValueError, match="ids"):
        generate(params, CFG, np.zeros((1, 0), np.int32), 3)
