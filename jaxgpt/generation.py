"""Text generation: the book's decoding strategies (4.7, 5.3) with a KV cache, compiled once.

Pure helpers turn next-token logits (B, V) into token ids, in the order Hugging Face applies
them: temperature scaling, then top-k (the book's mask below the k-th largest logit), then
top-p (nucleus), then a draw from the softmax with an explicit ``jax.random`` key. A
temperature of 0 means greedy decoding (argmax), the book's ``generate_text_simple``.

:func:`generate` runs the model the way a JAX user expects: one prefill pass writes the
prompt into a preallocated key/value cache, then a single jitted ``lax.while_loop`` feeds one
token per step, both through ``GPTModel(cfg, decode=True)`` over weights laid out once before the
loop (:func:`jaxgpt.ops.decode_params`). The shapes depend only on (batch, prompt length,
max_new_tokens), so the whole decode compiles once, however many tokens it produces.
:func:`generate_ragged` left-pads prompts of different lengths; the cache's ``start`` hides the
padding and shifts each row's positions, so every row sees exactly its own tokens.

When prompt + new tokens no longer fit in ``context_length``, the book crops the input to its
last ``context_length`` tokens. GPT-2's positional embeddings are absolute, so every cached key
changes once the window slides; the overflowing steps therefore recompute the whole window
(still inside the same jitted function): slower, never wrong.

Shapes: B batch, T prompt tokens (after left padding), N max_new_tokens, V vocab_size.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel, KVCache, Params, init_cache
from jaxgpt.ops import decode_params
from jaxgpt.xla import compiler_options

Array = jax.Array


# ----------------------------------------------------------------------------- sampling helpers


def apply_temperature(logits: Array, temperature: float | Array) -> Array:
    """Logits divided by ``temperature`` (> 0): below 1 sharpens the softmax, above 1 flattens it."""
    return logits / temperature


def top_k_mask(logits: Array, top_k: int) -> Array:
    """Logits (..., V) with every entry below the ``top_k``-th largest set to -inf (book 5.3.2).

    Entries tied with the k-th largest survive, as in the book's ``torch.where(logits < min_val, ...)``.
    """
    top_logits, _ = jax.lax.top_k(logits, top_k)  # (..., k)
    # The k-th largest as the min of the k, not top_logits[..., -1:]: XLA turns a top-k read only
    # at its last place into a sort of the whole vocabulary (10 ms a row on a CPU, not 0.1 ms).
    min_val = jnp.min(top_logits, axis=-1, keepdims=True)  # (..., 1)
    return jnp.where(logits < min_val, -jnp.inf, logits)


TOP_P_CANDIDATES = 1024  # top_p_mask looks for the nucleus among this many likeliest tokens first


def _nucleus_threshold(sorted_logits: Array, lse: Array, top_p: float | Array) -> tuple[Array, Array]:
    """The smallest logit in the nucleus, from the K largest logits (..., K) in descending order
    and the log-sum-exp (..., 1) of all of them -> (threshold (..., 1), whether the nucleus
    closed within these K (..., 1))."""
    probs = jnp.exp(sorted_logits - lse)  # (..., K): each token's probability
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # (..., K): mass ranked strictly above each token
    n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # (..., 1), at least 1
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)  # (..., 1): smallest kept logit
    return threshold, n_keep < sorted_logits.shape[-1]


def top_p_mask(logits: Array, top_p: float | Array) -> Array:
    """Logits (..., V) keeping only the nucleus: the likeliest tokens whose mass first reaches ``top_p``.

    A token survives when the probability mass of the tokens ranked above it is below ``top_p``,
    so the most likely token always survives; the rest are set to -inf.

    The ranking needs only the top of the order: the nucleus is looked for among the
    ``TOP_P_CANDIDATES`` largest logits (``lax.top_k``), and the whole vocabulary is sorted only
    when it does not close within them (XLA's sort takes about 10 ms a row of 50257 on a CPU).
    """
    V = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # (..., 1)
    candidates, _ = jax.lax.top_k(logits, min(V, TOP_P_CANDIDATES))  # (..., K), descending
    threshold, closed = _nucleus_threshold(candidates, lse, top_p)
    if candidates.shape[-1] < V:
        threshold = jax.lax.cond(
            jnp.all(closed),
            lambda: threshold,
            lambda: _nucleus_threshold(-jnp.sort(-logits, axis=-1), lse, top_p)[0],
        )
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _next_token(
    logits: Array,
    key: Array,
    temperature: float | Array,
    top_p: float | Array,
    *,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
) -> Array:
    """(B, V) logits -> (B,) int32 token ids; the branches are static, the values may be traced."""
    if greedy:  # top-k and top-p never change the argmax
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = apply_temperature(logits.astype(jnp.float32), temperature)
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if use_top_p:
        logits = top_p_mask(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)  # multinomial draw


_next_token_jit = jax.jit(_next_token, static_argnames=("greedy", "top_k", "use_top_p"))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sampling_args(
    temperature: Any, top_k: Any, top_p: Any, key: Any, vocab_size: int
) -> tuple[float, int | None, float | None]:
    """Validate the sampling arguments before any work starts; return them as plain Python numbers."""
    real = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not real or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        if not _is_int(top_k) or not 1 <= top_k <= vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}] or None, got {top_k!r}")
        top_k = int(top_k)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
        top_p = float(top_p)
    if temperature > 0 and key is None:
        raise ValueError("key is required when sampling (temperature > 0): pass e.g. key=jax.random.key(0)")
    return float(temperature), top_k, top_p


def sample_next_token(
    logits: Array,
    key: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Array:
    """Next-token ids (B,) from logits (B, V): greedy when ``temperature`` is 0, else a draw.

    The draw applies temperature, then :func:`top_k_mask`, then :func:`top_p_mask`, and samples
    from the softmax of what is left with ``key``.
    """
    temperature, top_k, top_p = _check_sampling_args(temperature, top_k, top_p, key, logits.shape[-1])
    use_top_p = top_p is not None and top_p < 1.0
    return _next_token_jit(
        jnp.asarray(logits),
        key if key is not None else jax.random.key(0),
        temperature,
        top_p if use_top_p else 1.0,
        greedy=temperature == 0.0,
        top_k=top_k,
        use_top_p=use_top_p,
    )


# ----------------------------------------------------------------------------- the decode loop


def _apply(params: Params, cfg: GPTConfig, idx: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """One model call with a cache: idx (B, T) -> last position's logits (B, V) and the new cache.

    ``params`` in the layout of :func:`jaxgpt.ops.decode_params`; every call of the decode runs
    through here, so the prefill, each decode step and each sliding-window step are one forward pass.
    """
    logits, cache = GPTModel(cfg, decode=True).apply({"params": params}, idx, cache=cache)
    return logits[:, -1, :], cache


def _generate_padded(
    params: Params,
    prompt: Array,
    start: Array,
    key: Array,
    temperature: Array,
    top_p: Array,
    *,
    cfg: GPTConfig,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
    eos_id: int | None,
    callback: Callable[[Any, Any], None] | None,
) -> Array:
    """Left-padded prompts (B, T <= context_length) with ``start`` (B,) padding slots -> new tokens (B, N)."""
    B, T = prompt.shape
    N, ctx = max_new_tokens, cfg.context_length
    n_cached = min(N, ctx - T + 1)  # tokens whose history fits in the cache (the first from the prefill)
    size = max(T, min(T + N - 1, ctx))  # cache slots: the prompt plus every token fed back
    pad = 0 if eos_id is None else eos_id

    static = dict(greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    def pick(logits: Array, t: Array, done: Array) -> tuple[Array, Array]:
        step_key = jax.random.fold_in(key, t)
        tok = _next_token(logits, step_key, temperature, top_p, **static)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)  # finished rows keep emitting eos
            done = done | (tok == eos_id)
        if callback is not None:
            jax.debug.callback(callback, t, tok, ordered=True)
        return tok, done

    def running(t: Array, done: Array, stop: int) -> Array:
        return (t < stop) & ~jnp.all(done) if eos_id is not None else t < stop

    params = decode_params(params, cfg)  # once, outside the loop
    # Prefill: the whole (padded) prompt in one pass; every row's last real token sits at slot T - 1.
    logits, cache = _apply(params, cfg, prompt, init_cache(cfg, B, size, start))
    tok, done = pick(logits, jnp.int32(0), jnp.zeros((B,), bool))
    out = jnp.full((B, N), pad, jnp.int32).at[:, 0].set(tok)  # (B, N)

    def cached_step(carry):
        t, tok, cache, out, done = carry  # token t-1 goes into slot cache["index"] = T + t - 1
        logits, cache = _apply(params, cfg, tok[:, None], cache)
        tok, done = pick(logits, t, done)
        return t + 1, tok, cache, jax.lax.dynamic_update_slice(out, tok[:, None], (0, t)), done

    t, tok, cache, out, done = jax.lax.while_loop(
        lambda c: running(c[0], c[4], n_cached), cached_step, (jnp.int32(1), tok, cache, out, done)
    )
    if N == n_cached:
        return out

    # The window slides: recompute the last ctx tokens of each row for every further token.
    buffer = jnp.concatenate([prompt, out], axis=1)  # (B, T + N)

    def window_step(carry):
        t, buffer, done = carry
        offset = T + t - ctx  # first slot of the window; >= 1 here
        window = jax.lax.dynamic_slice_in_dim(buffer, offset, ctx, axis=1)  # (B, ctx)
        window_start = jnp.clip(start - offset, 0, ctx)  # (B,): padding still inside the window
        logits, _ = _apply(params, cfg, window, init_cache(cfg, B, ctx, window_start))
        tok, done = pick(logits, t, done)
        return t + 1, jax.lax.dynamic_update_slice(buffer, tok[:, None], (0, T + t)), done

    _, buffer, _ = jax.lax.while_loop(lambda c: running(c[0], c[2], N), window_step, (t, buffer, done))
    return buffer[:, T:]


@functools.cache
def _jitted_generate(backend: str) -> Callable[..., Array]:
    """:func:`_generate_padded` jitted for ``backend`` (see :func:`jaxgpt.xla.compiler_options`)."""
    return jax.jit(
        _generate_padded,
        static_argnames=("cfg", "max_new_tokens", "greedy", "top_k", "use_top_p", "eos_id", "callback"),
        compiler_options=compiler_options(backend),
    )


def _check_rows(rows: list[np.ndarray], name: str, vocab_size: int) -> list[np.ndarray]:
    """Each prompt row must be integer token ids in [0, vocab_size); returned as int32."""
    for i, row in enumerate(rows):
        if not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"{name} must hold integer token ids, got dtype {row.dtype}")
        if row.min() < 0 or row.max() >= vocab_size:
            raise ValueError(f"{name} row {i} has token ids outside [0, vocab_size={vocab_size})")
    return [row.astype(np.int32) for row in rows]


def _new_tokens(
    params: Params,
    cfg: GPTConfig,
    rows: list[np.ndarray],
    max_new_tokens: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    eos_id: Any,
    key: Array | None,
    callback: Callable[[Any, Any], None] | None,
    pad_to: Any = None,
) -> Array:
    """Prompt rows of any lengths -> their new tokens (B, max_new_tokens), after checking every argument."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    temperature, top_k, top_p = _check_sampling_args(temperature, top_k, top_p, key, cfg.vocab_size)
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id must be in [0, vocab_size={cfg.vocab_size}) or None, got {eos_id}")
    if pad_to is not None and (not _is_int(pad_to) or pad_to < 1):
        raise ValueError(f"pad_to must be an integer >= 1 or None, got {pad_to!r}")
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens == 0:
        return jnp.zeros((len(rows), 0), jnp.int32)
    # Condition on each row's last context_length tokens; left-pad the rows to one length.
    cropped = [row[-cfg.context_length :] for row in rows]
    T = max(len(row) for row in cropped)
    if pad_to is not None:  # more padding slots, never more than the context holds
        T = max(T, min(pad_to, cfg.context_length))
    start = np.array([T - len(row) for row in cropped], np.int32)  # (B,) padding slots per row
    prompt = np.zeros((len(rows), T), np.int32)
    for i, row in enumerate(cropped):
        prompt[i, start[i] :] = row
    use_top_p = top_p is not None and top_p < 1.0
    new = _jitted_generate(jax.default_backend())(
        params,
        jnp.asarray(prompt),
        jnp.asarray(start),
        key if key is not None else jax.random.key(0),
        jnp.float32(temperature if temperature > 0 else 1.0),
        jnp.float32(top_p if use_top_p else 1.0),
        cfg=cfg,
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0.0,
        top_k=top_k,
        use_top_p=use_top_p,
        eos_id=None if eos_id is None else int(eos_id),
        callback=callback,
    )
    return jnp.asarray(new, jnp.int32)


def generate(
    params: Params,
    cfg: GPTConfig,
    ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    key: Array | None = None,
    callback: Callable[[Any, Any], None] | None = None,
    pad_to: int | None = None,
) -> Array:
    """Extend each prompt of ``ids`` (B, T) by ``max_new_tokens`` tokens -> (B, T + max_new_tokens).

    The book's ``generate`` (5.3.3), greedy by default as its ``generate_text_simple`` (4.7). A row
    that produced ``eos_id`` continues with ``eos_id`` to the end, so the shape is always the
    same; prompts of different lengths go to :func:`generate_ragged`.

    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature) with ``key``.
    top_k: keep only the k largest logits before sampling. top_p: keep only the nucleus of
    probability mass ``top_p`` (applied after temperature and top-k).
    eos_id: a row stops when it produces this token. key: a ``jax.random`` key, required when
    sampling; step t draws with ``fold_in(key, t)``, so the same key gives the same tokens.
    callback: ``callback(t, tokens)`` is called on the host with each step's index and (B,)
    tokens as they are produced (for streaming); a new callback compiles anew.
    pad_to: left-pad the prompts to this many tokens (at most ``context_length``), hidden from the
    model like :func:`generate_ragged`'s padding; prompts padded to one length share one compiled
    decode (the chat pads to multiples of 64 tokens). Each row conditions on its last
    ``context_length`` tokens, as the book crops the input.
    """
    try:
        arr = np.asarray(ids)
    except ValueError:  # rows of different lengths
        arr = np.empty((0,), object)
    if arr.dtype == object or arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"ids must be a non-empty (B, T) array of token ids, got shape {arr.shape}; "
            "for prompts of different lengths use generate_ragged"
        )
    rows = _check_rows(list(arr), "ids", cfg.vocab_size)
    new = _new_tokens(
        params, cfg, rows, max_new_tokens, temperature, top_k, top_p, eos_id, key, callback, pad_to
    )
    return jnp.concatenate([jnp.asarray(np.stack(rows)), new], axis=1)


def generate_ragged(
    params: Params,
    cfg: GPTConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    key: Array | None = None,
    callback: Callable[[Any, Any], None] | None = None,
) -> list[list[int]]:
    """Extend prompts of any lengths, B lists of token ids, by up to ``max_new_tokens`` tokens each.

    Returns B lists: each prompt followed by its new tokens, ending before its first ``eos_id`` (as
    the book's loop stops), so a row shorter than its prompt + ``max_new_tokens`` met eos. The
    prompts are left-padded into one batch whose padding no row ever sees. The other arguments
    are :func:`generate`'s.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, prompt in enumerate(prompts):
        arr = np.asarray(prompt)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty sequence of token ids, got shape {arr.shape}")
        rows.append(arr)
    rows = _check_rows(rows, "prompts", cfg.vocab_size)
    new = np.asarray(
        _new_tokens(params, cfg, rows, max_new_tokens, temperature, top_k, top_p, eos_id, key, callback)
    )
    result = []
    for row, row_new in zip(rows, new, strict=True):
        if eos_id is not None and np.any(row_new == eos_id):
            row_new = row_new[: int(np.argmax(row_new == eos_id))]
        result.append(row.tolist() + row_new.tolist())
    return result
