"""How good is a model: perplexity on a text, HellaSwag-style multiple choice, LAMBADA's last word.

All three score next-token losses with dropout off. Sequences are right-padded to a few fixed
lengths (by causality the padding never changes the logits of the real tokens), so a whole
evaluation compiles a handful of programs.

* :func:`perplexity`: Hugging Face's sliding-window procedure ("Perplexity of fixed-length
  models"): windows of ``context_length`` tokens start every ``stride`` tokens; the first
  window scores all its tokens, each later one only the tokens the previous window did not
  reach, with the rest of the window as their context. The loss is the mean over the scored
  tokens: every token but the first when windows overlap (``stride < context_length``); with
  disjoint windows each window's first token has no context and is not scored. (The guide
  weights each window's mean by its valid labels minus one, one token too few for later
  windows; this is the exact mean.)
* :func:`score_multiple_choice`: a context and N endings, each ending scored as a continuation.
  ``acc`` picks the ending with the lowest total loss, ``acc_norm`` the lowest mean loss per
  token (build-nanogpt's ``hellaswag.py``; lm-eval-harness normalises by characters instead).
* :func:`score_lambada`: the text up to its last space is the context, the last word (with its
  space) the target; correct when greedy decoding gives exactly the target's tokens. The
  perplexity is ``exp`` of the mean per-passage target loss, as lm-eval-harness reports it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel, Params
from jaxgpt.tokenizer import EOT_TEXT, get_tokenizer


class EvalDataError(ValueError):
    """An evaluation file in the wrong shape; the message names the file and line."""


@functools.partial(jax.jit, static_argnums=1)
def _next_token_scores(params: Params, cfg: GPTConfig, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Loss and greedy choice for each next token: tokens (B, L) -> nll (B, L-1), argmax (B, L-1)."""
    logits = GPTModel(cfg).apply({"params": params}, tokens, deterministic=True)[:, :-1]  # (B, L-1, V)
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])  # (B, L-1)
    return nll, jnp.argmax(logits, axis=-1)


def _check_vocab(ids: np.ndarray, cfg: GPTConfig) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(
            f"token id {int(ids.max())} is outside the model's vocabulary of {cfg.vocab_size} tokens "
            "(the model does not fit GPT-2 BPE text)"
        )


def _batches(rows: list[Any], batch_size: int) -> list[list[Any]]:
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """Mean next-token loss (nats) over ``tokens`` scored tokens, and its exponential."""

    loss: float
    perplexity: float
    tokens: int
    windows: int
    context_length: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity_windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over ``n_tokens`` tokens, as the guide's loop."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))  # token `begin` has no context here
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(
    params: Params,
    cfg: GPTConfig,
    tokens: str | Sequence[int] | np.ndarray,
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a text (or its token ids (T,)) with sliding windows.

    ``context_length`` defaults to the model's, ``stride`` to half of it (the guide's 512 of 1024);
    ``stride == context_length`` gives disjoint windows. ``batch_size`` windows run at once.
    """
    ids = np.asarray(
        get_tokenizer().encode(tokens, allowed_special={EOT_TEXT}) if isinstance(tokens, str) else tokens
    )
    ids = ids.astype(np.int32).reshape(-1)
    context_length = cfg.context_length if context_length is None else context_length
    stride = max(1, context_length // 2) if stride is None else stride
    if not 2 <= context_length <= cfg.context_length:
        raise ValueError(
            f"context_length must be in [2, {cfg.context_length}] (the model's), got {context_length}"
        )
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    if ids.size < 2:
        raise ValueError(f"the text has {ids.size} token(s); perplexity needs at least 2")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    _check_vocab(ids, cfg)

    windows = perplexity_windows(ids.size, context_length, stride)
    width = min(context_length, ids.size)  # every window is right-padded to this
    total, count = 0.0, 0
    rows = min(batch_size, len(windows))
    with _progress(math.ceil(len(windows) / rows), "perplexity", progress) as bar:
        for batch in _batches(windows, rows):
            tokens_in = np.zeros((rows, width), np.int32)
            scored = np.zeros((rows, width - 1), bool)
            for r, (begin, end, first) in enumerate(batch):
                tokens_in[r, : end - begin] = ids[begin:end]
                scored[r, first - begin - 1 : end - begin - 1] = True  # nll[j] scores token begin + j + 1
            nll, _ = _next_token_scores(params, cfg, jnp.asarray(tokens_in))
            total += float(np.asarray(nll, np.float64)[scored].sum())
            count += int(scored.sum())
            bar.update()
    loss = total / count
    return PerplexityResult(loss, math.exp(loss), count, len(windows), context_length, stride)


# ----------------------------------------------------------------------------- continuations


@dataclass(frozen=True)
class ContinuationScore:
    """Total loss of a continuation's tokens given its context, how many, and whether greedy
    decoding would produce exactly them."""

    loss: float
    tokens: int
    greedy: bool


def _bucket(length: int, cap: int) -> int:
    size = 16
    while size < length:
        size *= 2
    return min(size, cap)


def score_continuations(
    params: Params,
    cfg: GPTConfig,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    context_length: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> list[ContinuationScore]:
    """Score each ``(context ids, continuation ids)``; both non-empty. A pair longer than
    ``context_length`` loses context tokens from the left."""
    context_length = cfg.context_length if context_length is None else context_length
    if not 2 <= context_length <= cfg.context_length:
        raise ValueError(
            f"context_length must be in [2, {cfg.context_length}] (the model's), got {context_length}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    seqs = []
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: context and continuation must both have at least one token")
        if len(continuation) >= context_length:
            raise ValueError(
                f"pair {i}: the continuation has {len(continuation)} tokens; with context_length "
                f"{context_length} at most {context_length - 1} can be scored"
            )
        seq = np.asarray([*context, *continuation], np.int32)[-context_length:]
        _check_vocab(seq, cfg)
        seqs.append((i, seq, len(continuation)))

    by_bucket: dict[int, list[tuple[int, np.ndarray, int]]] = {}
    for item in seqs:
        by_bucket.setdefault(_bucket(len(item[1]), context_length), []).append(item)
    batches = [(width, b) for width, group in sorted(by_bucket.items()) for b in _batches(group, batch_size)]
    results: list[ContinuationScore | None] = [None] * len(seqs)
    with _progress(len(batches), desc, progress) as bar:
        for width, batch in batches:
            rows = min(batch_size, len(seqs))
            tokens_in = np.zeros((rows, width), np.int32)
            for r, (_, seq, _) in enumerate(batch):
                tokens_in[r, : len(seq)] = seq
            nll, greedy = (np.asarray(a) for a in _next_token_scores(params, cfg, jnp.asarray(tokens_in)))
            for r, (i, seq, n) in enumerate(batch):
                span = slice(len(seq) - n - 1, len(seq) - 1)  # predictions of the continuation's tokens
                results[i] = ContinuationScore(
                    loss=float(nll[r, span].astype(np.float64).sum()),
                    tokens=n,
                    greedy=bool(np.array_equal(greedy[r, span], seq[-n:])),
                )
            bar.update()
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class MultipleChoiceItem:
    """A context, its candidate endings, and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class MultipleChoiceResult:
    """``acc``: share of items whose lowest total loss is the label; ``acc_norm``: lowest mean
    loss per token. ``pred``/``pred_norm`` hold each item's choices."""

    acc: float
    acc_norm: float
    items: int
    pred: list[int] = field(default_factory=list)
    pred_norm: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "items": self.items}


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{n}: not a JSON object ({e.msg})") from None
    if not rows:
        raise EvalDataError(f"{path}: no items (the file is empty)")
    return rows


def read_multiple_choice(path: str | Path) -> list[MultipleChoiceItem]:
    """Items of a JSONL file in HellaSwag's form, one object per line: ``ctx`` (or ``context``),
    ``endings`` (a list of at least two strings) and ``label`` (the right ending's index)."""
    path = Path(path)
    items = []
    for n, row in _read_jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise EvalDataError(f"{where}: expected a JSON object with ctx, endings and label")
        context = row.get("ctx", row.get("context"))
        endings, label = row.get("endings"), row.get("label")
        if not isinstance(context, str) or not context.strip():
            raise EvalDataError(f"{where}: 'ctx' (or 'context') must be a non-empty string")
        if (
            not isinstance(endings, list)
            or len(endings) < 2
            or not all(isinstance(e, str) and e for e in endings)
        ):
            raise EvalDataError(f"{where}: 'endings' must be a list of at least two non-empty strings")
        if isinstance(label, str) and label.strip().isdigit():  # Hugging Face's copy stores "3"
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise EvalDataError(f"{where}: 'label' must be an index into endings (0..{len(endings) - 1})")
        items.append(MultipleChoiceItem(context, tuple(endings), label))
    return items


def score_multiple_choice(
    params: Params,
    cfg: GPTConfig,
    items: Sequence[MultipleChoiceItem],
    *,
    context_length: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> MultipleChoiceResult:
    """Accuracy of choosing each item's ending by lowest total loss (``acc``) and lowest mean
    loss per token (``acc_norm``). Each ending is scored as ``" " + ending`` after the context."""
    tokenizer = get_tokenizer()
    pairs, owners = [], []
    for i, item in enumerate(items):
        context = tokenizer.encode(item.context, allowed_special={EOT_TEXT})
        for ending in item.endings:
            pairs.append((context, tokenizer.encode(" " + ending, allowed_special={EOT_TEXT})))
            owners.append(i)
    scores = score_continuations(
        params,
        cfg,
        pairs,
        context_length=context_length,
        batch_size=batch_size,
        progress=progress,
        desc="choices",
    )
    pred, pred_norm = [], []
    start = 0
    for item in items:
        mine = scores[start : start + len(item.endings)]
        start += len(item.endings)
        pred.append(int(np.argmin([s.loss for s in mine])))
        pred_norm.append(int(np.argmin([s.loss / s.tokens for s in mine])))
    n = len(items)
    acc = sum(p == item.label for p, item in zip(pred, items, strict=True)) / n
    acc_norm = sum(p == item.label for p, item in zip(pred_norm, items, strict=True)) / n
    return MultipleChoiceResult(acc, acc_norm, n, pred, pred_norm)


# ----------------------------------------------------------------------------- LAMBADA


@dataclass(frozen=True)
class LambadaResult:
    """``acc``: share of passages whose last word greedy decoding gets exactly; ``perplexity``:
    exp of the mean (over passages) total loss of the last word."""

    acc: float
    perplexity: float
    items: int
    correct: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "perplexity": self.perplexity, "items": self.items}


def read_lambada(path: str | Path) -> list[str]:
    """Passages from a JSONL file (``.jsonl``/``.json``: objects with ``text``) or a plain text
    file (one passage per line; blank lines skipped). Each needs a space before its last word."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
        passages = []
        for n, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise EvalDataError(f"{path}:{n}: expected a JSON object with a 'text' string")
            passages.append((n, row["text"]))
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise EvalDataError(f"{path}: not UTF-8 text ({e})") from None
        passages = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        if not passages:
            raise EvalDataError(f"{path}: no items (the file is empty)")
    texts = []
    for n, text in passages:
        text = text.strip()
        if " " not in text:
            raise EvalDataError(f"{path}:{n}: needs a context and a last word separated by a space")
        texts.append(text)
    return texts


def lambada_split(text: str) -> tuple[str, str]:
    """(context, target): the target is the last word with the space before it."""
    text = text.strip()
    cut = text.rindex(" ")
    return text[:cut], text[cut:]


def score_lambada(
    params: Params,
    cfg: GPTConfig,
    passages: Sequence[str],
    *,
    context_length: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> LambadaResult:
    """Last-word accuracy (greedy) and perplexity of the last word over ``passages``."""
    tokenizer = get_tokenizer()
    pairs = []
    for text in passages:
        context, target = lambada_split(text)
        pairs.append((tokenizer.encode(context), tokenizer.encode(target)))
    scores = score_continuations(
        params,
        cfg,
        pairs,
        context_length=context_length,
        batch_size=batch_size,
        progress=progress,
        desc="lambada",
    )
    correct = [s.greedy for s in scores]
    mean_loss = sum(s.loss for s in scores) / len(scores)
    return LambadaResult(sum(correct) / len(scores), math.exp(mean_loss), len(scores), correct)
