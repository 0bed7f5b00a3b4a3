import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt
from jaxgpt import generation as gen
from jaxgpt.config import GPTConfig
from jaxgpt.generation import generate, generate_ragged, sample_next_token, top_k_mask, top_p_mask
from jaxgpt.model import GPTModel, init_params

CFG = GPTConfig(vocab_size=61, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(3))


@jax.jit
def _full_pass(params, idx):
    return GPTModel(CFG).apply({"params": params}, idx)  # (B, context_length, V), no cache


def _last_logits(params, cfg, ids):
    """Uncached logits (B, V) after the last context_length tokens of ids (B, T).

    The window is right-padded to a fixed length so one compile serves every step; by causality
    (tested in test_model.py) the padding does not change the logits at the last real position.
    """
    assert cfg == CFG
    window = np.asarray(ids)[:, -cfg.context_length :]
    n = window.shape[1]
    padded = np.pad(window, ((0, 0), (0, cfg.context_length - n)))
    return np.asarray(_full_pass(params, jnp.asarray(padded, jnp.int32)))[:, n - 1]


def _reference_greedy(params, cfg, ids, n):
    """The book's generate_text_simple, step by step in NumPy around the model."""
    ids = np.asarray(ids)
    for _ in range(n):
        ids = np.concatenate([ids, _last_logits(params, cfg, ids).argmax(-1)[:, None]], axis=1)
    return ids


# --- greedy decoding with the cache == the book's crop-and-argmax loop ---


def test_greedy_generation_crops_to_the_context_and_takes_the_argmax(params):
    prompt = np.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]], np.int32)
    out = np.asarray(generate(params, CFG, prompt, max_new_tokens=6))  # 11 tokens > context 8
    assert out.shape == (2, 11)
    np.testing.assert_array_equal(out[:, :5], prompt)
    np.testing.assert_array_equal(out, _reference_greedy(params, CFG, prompt, 6))


@pytest.mark.parametrize("prompt_len, n", [(7, 4), (11, 2)])  # reaching past the context; longer than it
def test_greedy_batch_matches_the_uncached_reference_near_the_context_limit(params, prompt_len, n):
    prompt = np.random.default_rng(prompt_len).integers(0, CFG.vocab_size, (3, prompt_len)).astype(np.int32)
    out = np.asarray(generate(params, CFG, prompt, n))
    np.testing.assert_array_equal(out, _reference_greedy(params, CFG, prompt, n))


def test_prompts_of_different_lengths_each_match_their_own_generation(params):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, CFG.vocab_size, size).tolist() for size in (2, 6, 4, 10)]
    out = generate_ragged(params, CFG, prompts, max_new_tokens=5)  # rows of 6 and 10 overflow the context
    assert isinstance(out, list) and len(out) == 4
    for prompt, row in zip(prompts, out, strict=True):
        expected = _reference_greedy(params, CFG, np.array([prompt], np.int32), 5)[0]
        assert row == expected.tolist()


def test_padding_a_prompt_to_a_longer_length_changes_no_token(params):
    """pad_to left-pads like generate_ragged's shorter rows: hidden, so prompts can share a compile."""
    prompt = np.array([[4, 8, 15]], np.int32)
    out = np.asarray(generate(params, CFG, prompt, 3, pad_to=5))  # 3 + 3 tokens still fit the context 8
    np.testing.assert_array_equal(out, _reference_greedy(params, CFG, prompt, 3))
    with pytest.raises(ValueError, match="pad_to"):
        generate(params, CFG, prompt, 3, pad_to=0)


def test_decoding_compiles_once_whatever_the_number_of_tokens(params, monkeypatch):
    """GPTModel is traced for the prefill, one decode step and one sliding-window step, never per token."""
    traces = []

    def counting(name, fn):
        def wrapper(*args):
            traces.append(name)
            return fn(*args)

        return wrapper

    monkeypatch.setattr(gen, "_apply", counting("model", gen._apply))
    jitted = gen._jitted_generate(jax.default_backend())
    jitted.clear_cache()
    prompt = np.array([[1, 2, 3]], np.int32)
    generate(params, CFG, prompt, 12)  # 6 tokens from the cache, then 6 past the context of 8
    assert traces == ["model"] * 3  # prefill, decode step, window step: one forward pass each
    generate(params, CFG, prompt[:, ::-1], 12)
    sample = dict(top_k=5, key=jax.random.key(0))
    generate(params, CFG, prompt, 12, temperature=0.7, **sample)
    generate(params, CFG, prompt, 12, temperature=1.3, **sample)  # the temperature is traced, not static
    assert jitted._cache_size() == 2  # one greedy, one sampling program
    assert len(traces) == 6


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_decode_loop_updates_each_cache_in_place(batch_size):
    # At B=1 XLA once fused the cache update into the bitcast that drops the batch axis and then
    # copied each layer's caches five times per token (a third of a token's time at a long
    # context). The loop carries the caches as (B * n_heads, S, head_dim) so none is copied.
    cfg = CFG.replace(context_length=64)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    prompt, start = jnp.zeros((batch_size, 5), jnp.int32), jnp.zeros((batch_size,), jnp.int32)
    hlo = (
        gen._jitted_generate("cpu")
        .lower(params, prompt, start, jax.random.key(0), jnp.float32(1), jnp.float32(1), cfg=cfg,
               max_new_tokens=20, greedy=True, top_k=None, use_top_p=False, eos_id=None, callback=None)
        .compile()
        .as_text()
    )  # fmt: skip
    B, H, S, hd = batch_size, cfg.n_heads, 24, cfg.head_dim  # S: the prompt + 19 tokens fed back
    caches = (f"f32[{B * H},{S},{hd}]", f"f32[{B},{H},{S},{hd}]")  # a layer's, either layout
    copies = [line for line in hlo.splitlines() if " copy(" in line and any(c in line for c in caches)]
    assert caches[0] in hlo and not copies, copies[:3]


# --- stopping at eos ---


def test_rows_stop_at_eos_and_then_repeat_it(params):
    prompt = np.array([[1, 2, 3], [30, 31, 32]], np.int32)
    reference = _reference_greedy(params, CFG, prompt, 4)
    eos = int(reference[0, 4])  # the second token row 0 produces
    out = np.asarray(generate(params, CFG, prompt, 4, eos_id=eos))
    lists = generate_ragged(params, CFG, prompt.tolist(), 4, eos_id=eos)
    for i in range(2):
        new = reference[i, 3:].copy()
        hits = np.flatnonzero(new == eos)
        stop = hits[0] if hits.size else len(new)
        new[stop:] = eos  # a finished row keeps emitting eos
        np.testing.assert_array_equal(out[i], np.concatenate([prompt[i], new]))
        assert lists[i] == reference[i, : 3 + stop].tolist()  # ends before eos, like the book's loop


def test_generation_ends_early_when_every_row_has_met_eos(params):
    prompt = np.array([[1, 2, 3]], np.int32)
    eos = int(_reference_greedy(params, CFG, prompt, 1)[0, 3])  # the very first new token
    out = generate_ragged(params, CFG, prompt.tolist(), 50, eos_id=eos)
    assert out == [[1, 2, 3]]


# --- sampling ---


def test_top_k_mask_reproduces_the_books_example():
    # Book 5.3.2: next_token_logits and the top-3 masked result.
    logits = jnp.array([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])
    inf = -np.inf
    expected = [4.51, inf, inf, 6.75, inf, inf, inf, 6.28, inf]
    np.testing.assert_allclose(np.asarray(top_k_mask(logits[None], 3))[0], expected, rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="guards a rewrite of XLA's CPU compiler")
def test_top_k_mask_takes_the_top_k_without_sorting_the_vocabulary():
    # XLA rewrites a top-k read only at its k-th place into a sort of all V logits (10 ms a row on
    # a CPU, 60x a top-k): the mask reads the k-th largest as the min of the k instead.
    hlo = jax.jit(top_k_mask, static_argnums=1).lower(jnp.zeros((2, 50257)), 25).compile().as_text()
    assert " sort(" not in hlo


def _reference_top_p(logits, p):
    """The nucleus by its definition, in float64: sort, then keep each token whose higher-ranked
    mass is below p (and every token tied with the last one kept)."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-logits, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    threshold = logits[order][(mass_before < p).sum() - 1]
    return logits >= threshold


def test_top_p_mask_matches_the_definition_over_a_large_vocabulary():
    """V = 3000 > TOP_P_CANDIDATES: nuclei of a few tokens (found among the top candidates), of
    more than TOP_P_CANDIDATES (found by sorting all V), and a batch holding both kinds."""
    rng = np.random.default_rng(11)
    peaked = (rng.normal(size=(2, 3000)) * 8.0).astype(np.float32)
    flat = (rng.normal(size=(2, 3000)) * 0.2).astype(np.float32)
    for p in (0.5, 0.9):
        for logits in (peaked, flat, np.concatenate([peaked[:1], flat[:1]])):
            expected = np.stack([_reference_top_p(row, p) for row in logits])
            kept = np.isfinite(np.asarray(top_p_mask(jnp.asarray(logits), p)))
            np.testing.assert_array_equal(kept, expected)
        sizes = [_reference_top_p(row, p).sum() for row in (*peaked, *flat)]
        assert max(sizes[:2]) < gen.TOP_P_CANDIDATES <= min(sizes[2:]), sizes  # both paths were taken


def test_top_p_mask_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(top_p_mask(logits, p))[0])  # noqa: E731
    np.testing.assert_array_equal(kept(0.4), [False, True, False, False])
    np.testing.assert_array_equal(kept(0.7), [False, True, False, True])
    np.testing.assert_array_equal(kept(0.9), [True, True, False, True])
    np.testing.assert_array_equal(kept(1.0), [True, True, True, True])


def _draws(logits, n, key=0, **kw):
    """n independent draws from one row of logits: the row repeated n times, one key."""
    batch = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1))
    return np.asarray(sample_next_token(batch, jax.random.key(key), **kw))


def test_sampled_tokens_lie_in_the_true_top_k_and_top_p_sets():
    logits = np.random.default_rng(0).normal(size=50) * 2
    order = np.argsort(-logits)
    draws = _draws(logits, 2000, temperature=1.5, top_k=7)
    assert set(draws) <= set(order[:7]) and len(set(draws)) > 1
    probs = np.exp(logits / 0.8) / np.exp(logits / 0.8).sum()
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)]  # shortest prefix reaching 0.6
    draws = _draws(logits, 2000, temperature=0.8, top_p=0.6)
    assert set(draws) <= set(nucleus) and len(set(draws)) > 1


def test_top_k_1_and_tiny_temperature_are_greedy():
    logits = np.random.default_rng(1).normal(size=(64, 40)).astype(np.float32)
    greedy = logits.argmax(-1)
    logits, key = jnp.asarray(logits), jax.random.key(2)
    np.testing.assert_array_equal(sample_next_token(logits, key, 1.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample_next_token(logits, key, 1e-4), greedy)
    np.testing.assert_array_equal(sample_next_token(logits), greedy)


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (2.0, 3)])
def test_sample_frequencies_follow_the_tempered_softmax(temperature, top_k):
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0])
    n = 20_000
    draws = _draws(logits, n, key=5, temperature=temperature, top_k=top_k)
    scaled = logits / temperature
    if top_k is not None:
        scaled = np.where(logits < np.sort(logits)[-top_k], -np.inf, scaled)
    expected = np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()
    freq = np.bincount(draws, minlength=5) / n
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9  # 5 standard errors per token
    assert np.all(np.abs(freq - expected) <= tolerance), (freq, expected)


def test_sampling_with_the_cache_matches_an_uncached_loop_with_the_same_keys(params):
    prompt = np.array([[3, 1, 4], [1, 5, 9]], np.int32)
    key = jax.random.key(42)
    out = np.asarray(generate(params, CFG, prompt, 7, temperature=1.2, top_k=20, top_p=0.9, key=key))
    ids = prompt
    for t in range(7):  # step t draws with fold_in(key, t), as documented
        logits = jnp.asarray(_last_logits(params, CFG, ids))
        tok = np.asarray(sample_next_token(logits, jax.random.fold_in(key, t), 1.2, top_k=20, top_p=0.9))
        ids = np.concatenate([ids, tok[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)


def test_same_key_same_tokens_other_key_other_tokens(params):
    prompt = np.array([[7, 7, 7]], np.int32)  # the shapes of the compile test: no new program

    def run(seed):
        key = jax.random.key(seed)
        return np.asarray(generate(params, CFG, prompt, 12, temperature=2.0, top_k=5, key=key))

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_callback_streams_every_token_in_order(params):
    seen = []
    prompt = np.array([[2, 4, 6, 8]], np.int32)

    def record(t, tok):
        seen.append((int(t), int(tok[0])))

    out = np.asarray(generate(params, CFG, prompt, 6, callback=record))
    assert seen == [(t, int(out[0, 4 + t])) for t in range(6)]


# --- argument checks ---


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=CFG.vocab_size + 1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=1.0), "key"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(eos_id=CFG.vocab_size), "eos_id"),
    ],
)
def test_invalid_arguments_name_the_argument(params, kwargs, name):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate(params, CFG, np.array([[1, 2]], np.int32), **kwargs)


@pytest.mark.parametrize(
    "ids", [np.zeros((1, 0), np.int32), [[1, 2], []], [[1, 2], [3]], [1, 2, 3], np.array([[1, 61]])]
)
def test_empty_or_malformed_prompts_are_rejected(params, ids):
    with pytest.raises(ValueError, match="ids"):
        generate(params, CFG, ids, 3)


@pytest.mark.parametrize("prompts", [[], [[1, 2], []], [1, 2, 3], [[1, 61]], "abc"])
def test_empty_or_malformed_ragged_prompts_are_rejected(params, prompts):
    with pytest.raises(ValueError, match="prompts"):
        generate_ragged(params, CFG, prompts, 3)


def test_generate_always_returns_an_array_and_generate_ragged_lists(params):
    out = generate(params, CFG, [[1, 2, 3], [4, 5, 6]], 2)  # equal lengths as lists: still (B, T + n)
    assert isinstance(out, jax.Array) and out.shape == (2, 5)
    lists = generate_ragged(params, CFG, [[1, 2, 3], [4, 5, 6]], 2)
    assert lists == np.asarray(out).tolist()
    assert jaxgpt.generate is generate and jaxgpt.generate_ragged is generate_ragged
    assert jaxgpt.generation is gen  # the module keeps its own name


def test_zero_new_tokens_returns_the_prompt(params):
    prompt = np.array([[1, 2, 3]], np.int32)
    np.testing.assert_array_equal(generate(params, CFG, prompt, 0), prompt)
