"""Chat with an instruction-tuned model (the book's chapter 7 format): streamed replies, several turns.

:func:`stream_tokens` yields each new token as the KV-cache decode of :func:`jaxgpt.generate`
produces it: the decode runs in a worker thread and hands every token over through ``generate``'s
host callback, so streaming runs the very same compiled loop (one forward pass for everything)
and yields exactly ``generate``'s tokens. The callback is one module-level function, so the decode
compiles once per shape, not once per stream; streams therefore take turns (a lock). Prompts are
left-padded to a multiple of 64 tokens, so a conversation whose prompt grows each turn reuses one
compiled decode per bucket. Closing a stream early stops the decode at its next token.

:func:`stream_text` turns those tokens into text pieces. GPT-2's byte-level BPE can split one
UTF-8 character over several tokens; a piece holds only complete characters, the rest waits for
the next token.

:class:`ChatModel` holds a conversation's prompt format and sampling settings. A conversation is a
list of messages, ``{"role": "user" | "assistant", "content": str}``, alternating and ending with
the user's. Each exchange is written in the instruction format of :mod:`jaxgpt.instruct` (the
user's message as the instruction, the reply as the response), earlier exchanges first, separated
by a blank line. When that does not fit in the context with room for the reply, the oldest
exchanges are dropped, and if the last message alone is still too long its beginning is cut;
each :class:`Reply` says what was dropped.
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.generation import _check_sampling_args, _is_int, generate
from jaxgpt.instruct import PROMPT_STYLES, format_prompt
from jaxgpt.model import Params
from jaxgpt.tokenizer import EOT_ID, get_tokenizer

ROLES = ("user", "assistant")
PROMPT_BUCKET = 64  # prompts are padded to a multiple of this many tokens: one compile per bucket

# ----------------------------------------------------------------------------- streaming


class _Cancelled(Exception):
    """Raised inside the decode's host callback to stop a stream whose reader went away."""


@dataclass
class _Sink:
    """Where the decode of one stream puts its tokens; it runs at most a token ahead of its reader."""

    tokens: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=1))
    cancelled: bool = False
    produced: int = 0  # tokens handed over


_DECODE_LOCK = threading.Lock()  # one stream decodes at a time: they share _emit and its sink
_sink: _Sink | None = None
_DONE = object()


class _QuietCancel(logging.Filter):
    """JAX logs every exception raised in a host callback; a cancelled stream is no error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Cancelled))


logging.getLogger("jax._src.debugging").addFilter(_QuietCancel())


def _emit(t: Any, tokens: Any) -> None:
    """The host callback of every streamed decode: hand row 0's new token to the current reader.

    Being the same function every time, it keeps ``generate``'s compiled loop cached.
    """
    sink, token = _sink, int(np.asarray(tokens)[0])
    while sink is not None and not sink.cancelled:
        try:
            sink.tokens.put(token, timeout=0.05)  # waits while the reader has not taken the last one
        except queue.Full:
            continue
        sink.produced += 1
        return
    raise _Cancelled  # the reader went away: abort the running decode


def new_token_limit(cfg: GPTConfig, n_prompt: int, max_new_tokens: int) -> int:
    """How many tokens a stream may add after ``n_prompt`` prompt tokens: ``max_new_tokens``, or
    fewer where the context would overflow (a prompt of ``context_length`` tokens or more is cut
    to ``context_length - 1``, leaving room for one)."""
    return max(0, min(max_new_tokens, cfg.context_length - min(n_prompt, cfg.context_length - 1)))


def stream_tokens(
    params: Params,
    cfg: GPTConfig,
    ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = EOT_ID,
    key: jax.Array | None = None,
    bucket: int | None = PROMPT_BUCKET,
) -> Iterator[int]:
    """An iterator over the tokens that continue ``ids`` (one prompt, T token ids), each as decoded.

    The arguments are :func:`jaxgpt.generate`'s and the tokens are its tokens. The stream stops
    at ``eos_id`` (not yielded; None never stops early), after ``max_new_tokens``, or when prompt
    and reply fill ``context_length``: a longer prompt keeps its last ``context_length - 1``
    tokens. Closing the iterator early stops the decode at its next token. ``bucket``: the prompt
    is left-padded (``generate``'s ``pad_to``, invisible to the model) to a multiple of this many
    tokens, so that a conversation, whose prompt grows every turn, compiles its decode once per
    bucket rather than once per turn; None pads nothing. Arguments are checked at once.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be a non-empty sequence of token ids, got shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
        raise ValueError(f"ids holds token ids outside [0, vocab_size={cfg.vocab_size})")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    _check_sampling_args(temperature, top_k, top_p, key, cfg.vocab_size)  # generate's own checks, now
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id must be in [0, vocab_size={cfg.vocab_size}) or None, got {eos_id!r}")
    arr = arr[-(cfg.context_length - 1) :] if cfg.context_length > 1 else arr[-1:]
    if bucket is not None and (not _is_int(bucket) or bucket < 1):
        raise ValueError(f"bucket must be an integer >= 1 or None, got {bucket!r}")
    n_new = new_token_limit(cfg, arr.size, max_new_tokens)
    pad_to = None
    if bucket is not None:  # the next multiple of bucket, short of where the reply would overflow
        pad_to = max(arr.size, min(-(-arr.size // bucket) * bucket, cfg.context_length - n_new))
    return _stream(params, cfg, arr, n_new, temperature, top_k, top_p, eos_id, key, pad_to)


def _stream(params, cfg, arr, n_new, temperature, top_k, top_p, eos_id, key, pad_to) -> Iterator[int]:
    """The generator behind :func:`stream_tokens`, whose arguments are checked."""
    global _sink
    if n_new == 0:
        return
    with _DECODE_LOCK:
        sink = _sink = _Sink()

        def work() -> None:
            try:
                generate(
                    params, cfg, arr[None].astype(np.int32), n_new,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, key=key,
                    callback=_emit, pad_to=pad_to,
                )  # fmt: skip
                sink.tokens.put(_DONE)
            except BaseException as e:  # handed to the reader, who raises it unless it cancelled
                sink.tokens.put(e)

        worker = threading.Thread(target=work, name="jaxgpt-stream", daemon=True)
        worker.start()
        try:
            for _ in range(n_new + 1):
                item = sink.tokens.get()
                if item is _DONE or (eos_id is not None and item == eos_id):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            sink.cancelled = True  # the decode stops at its next token if it is still running
            while worker.is_alive():  # take what it still hands over, so that it can end
                try:
                    sink.tokens.get(timeout=0.05)
                except queue.Empty:
                    pass
            _sink = None


def text_pieces(tokens: Iterable[int], tokenizer: Any = None) -> Iterator[str]:
    """Decode a stream of GPT-2 token ids into non-empty pieces of complete UTF-8 text.

    The bytes of a character that a token split wait for the next token; an incomplete character
    left at the end becomes U+FFFD, as ``tokenizer.decode`` would write it.
    """
    tokenizer = tokenizer or get_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        if text := decoder.decode(tokenizer.decode_single_token_bytes(token)):
            yield text
    if text := decoder.decode(b"", final=True):
        yield text


def stream_text(
    params: Params,
    cfg: GPTConfig,
    ids: Sequence[int],
    max_new_tokens: int,
    *,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Iterator[str]:
    """:func:`stream_tokens` (same arguments) decoded: the reply as pieces of text, each of complete
    characters (see :func:`text_pieces`)."""
    return text_pieces(stream_tokens(params, cfg, ids, max_new_tokens, **kwargs), tokenizer)


# ----------------------------------------------------------------------------- conversations


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The messages of a conversation, checked: a non-empty list of ``{"role", "content"}`` objects
    whose roles alternate user, assistant, ..., user. A ValueError names the first fault."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        extra = set(message) - {"role", "content"}
        if extra:
            raise ValueError(f"messages[{i}] has unknown fields: {', '.join(sorted(map(str, extra)))}")
        role, content = message.get("role"), message.get("content")
        expected = ROLES[i % 2]
        if role != expected:
            raise ValueError(
                f"messages[{i}].role must be {expected!r} (user and assistant alternate), got {role!r}"
            )
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user":
        raise ValueError("the last message must be the user's")
    if not checked[-1]["content"].strip():
        raise ValueError(f"messages[{len(checked) - 1}].content (the user's last message) is empty")
    return checked


def conversation_text(messages: Sequence[Mapping[str, str]], style: str = "alpaca") -> str:
    """The prompt of a checked conversation: each exchange in the instruction format, the last
    message as an instruction awaiting its response."""
    turns = []
    for i in range(0, len(messages), 2):
        turn = format_prompt({"instruction": messages[i]["content"]}, style)
        if i + 1 < len(messages):
            turn += messages[i + 1]["content"]
        turns.append(turn)
    return "\n\n".join(turns)


@dataclass
class Reply:
    """A streamed reply: iterate for its text pieces; afterwards ``text``, ``n_tokens`` and ``stop``
    (``"eos"``, ``"max_new_tokens"`` or ``"context"``) say how it ended. ``prompt_tokens``,
    ``dropped_messages`` (earlier messages left out to fit the context) and ``cut`` (the last
    message lost its beginning) are known at once."""

    prompt_tokens: int
    dropped_messages: int
    cut: bool
    limit: int
    max_new_tokens: int
    _tokens: Iterator[int]
    _tokenizer: Any
    text: str = ""
    n_tokens: int = 0
    stop: str | None = None

    def __iter__(self) -> Iterator[str]:
        def counted() -> Iterator[int]:
            for token in self._tokens:
                self.n_tokens += 1
                yield token

        try:
            for piece in text_pieces(counted(), self._tokenizer):
                self.text += piece
                yield piece
        finally:
            getattr(self._tokens, "close", lambda: None)()
        if self.n_tokens < self.limit:
            self.stop = "eos"
        else:
            self.stop = "context" if self.limit < self.max_new_tokens else "max_new_tokens"

    @property
    def truncated(self) -> bool:
        return self.dropped_messages > 0 or self.cut


@dataclass
class ChatModel:
    """A model with its tokenizer, prompt style and sampling settings, ready to reply to a conversation.

    ``temperature`` 0 is greedy, as the book's chapter 7 answers; otherwise reply number ``turn``
    samples with ``fold_in(key(seed), turn)``, so a conversation replays the same.
    """

    params: Params
    cfg: GPTConfig
    prompt_style: str = "alpaca"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt style {self.prompt_style!r}; expected one of {PROMPT_STYLES}")
        if self.tokenizer is None:
            self.tokenizer = get_tokenizer()
        self.eos_id = EOT_ID if EOT_ID < self.cfg.vocab_size else None

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Prompt tokens allowed so that the reply keeps ``max_new_tokens`` of room, or half the context."""
        ctx = self.cfg.context_length
        return max(1, ctx - min(max_new_tokens, ctx // 2))

    def encode(
        self, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> tuple[list[int], int, bool]:
        """Prompt token ids of a checked conversation that fit :meth:`prompt_budget`, the number of
        earlier messages dropped, and whether the last message was cut at its beginning."""
        budget = self.prompt_budget(max_new_tokens)
        for first in range(0, len(messages), 2):  # drop the oldest exchanges first
            text = conversation_text(messages[first:], self.prompt_style)
            ids = self.tokenizer.encode(text, disallowed_special=())  # "<|endoftext|>" typed is text
            if len(ids) <= budget:
                return ids, first, False
        return ids[-budget:], len(messages) - 1, True

    def reply(self, messages: Any, turn: int = 0, **settings: Any) -> Reply:
        """Start the reply to ``messages`` (checked; see :func:`check_messages`). ``settings``
        override this model's ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``."""
        messages = check_messages(messages)
        unknown = set(settings) - {"max_new_tokens", "temperature", "top_k", "top_p", "seed"}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        s = {k: getattr(self, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
        s.update(settings)
        ids, dropped, cut = self.encode(messages, s["max_new_tokens"])
        key = jax.random.fold_in(jax.random.key(s["seed"]), turn) if s["temperature"] > 0 else None
        tokens = stream_tokens(
            self.params, self.cfg, ids, s["max_new_tokens"],
            temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], eos_id=self.eos_id, key=key,
        )  # fmt: skip
        return Reply(
            prompt_tokens=len(ids),
            dropped_messages=dropped,
            cut=cut,
            limit=new_token_limit(self.cfg, len(ids), s["max_new_tokens"]),
            max_new_tokens=s["max_new_tokens"],
            _tokens=tokens,
            _tokenizer=self.tokenizer,
        )
