"""Instruction fine-tuning (chapter 7 of the book): prompts, data, batches, responses, scoring.

An entry is a dict with ``instruction``, an optional ``input`` and, for training, ``output``.
The book's Alpaca-style prompt is the default; the Phi-3 style of its exercise 7.1 is the
other choice. A prompt ends just before the response, so the same text serves training
(prompt + response), generation (the prompt alone) and chat.

The pieces, in the order chapter 7 builds them:

  format_input, format_prompt, format_example, extract_response     the prompt (7.2)
  load_instruction_data   the JSON file, every entry checked, errors naming the entry (7.2)
  split_data              the book's 85% train / 10% test / 5% validation slices (7.2)
  InstructionDataset      each entry's token ids and its instruction's length (7.3)
  custom_collate_fn       pad with 50256 to the longest + 1, shift the targets, ignore
                          (-100) every padding target after the first end-of-text, optional
                          allowed_max_length and instruction masking (7.3, exercise 7.2)
  InstructionLoader       batches of a dataset, their lengths rounded up to a few buckets (7.3)
  response_loss           mean loss of the reference answers' tokens under a model
  generate_responses      greedy answers to the test entries, after the response marker (7.7)
  query_model, generate_model_scores    a larger model grades each answer 0-100 (7.8)

Training itself is :func:`jaxgpt.train.train` on these loaders: its loss ignores the -100
targets exactly as ``torch.nn.functional.cross_entropy`` does (see :mod:`jaxgpt.loss`).

Bucketing. The book pads each batch to its own longest entry, so nearly every batch has a new
length, and a jitted step compiles once per shape. :class:`InstructionLoader` pads the length
further up to a multiple of ``bucket`` (extra inputs 50256, extra targets -100) and a short last
batch up to ``batch_size`` rows of ignored targets. Under the causal mask the extra positions
change no earlier logit and add no loss, so every batch's loss is the book's, while the number
of shapes is at most ``context_length / bucket``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import GPTConfig
from jaxgpt.data import BatchOrder
from jaxgpt.generation import generate_ragged
from jaxgpt.loss import IGNORE_INDEX
from jaxgpt.model import GPTModel, Params
from jaxgpt.tokenizer import get_tokenizer

Array = jax.Array
PAD_TOKEN_ID = 50256  # <|endoftext|>: the book's padding and end-of-answer token

PROMPT_STYLES = ("alpaca", "phi3")

_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
# What separates the prompt from the response, per style.
_RESPONSE_MARKER = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>:\n"}


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(PROMPT_STYLES)}")


def format_input(entry: Mapping[str, str], style: str = "alpaca") -> str:
    """The instruction and its optional input as the prompt text, without the response marker."""
    _check_style(style)
    extra = entry.get("input") or ""
    if style == "alpaca":
        text = f"{_ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
        return text + (f"\n\n### Input:\n{extra}" if extra else "")
    text = f"<|user|>\n{entry['instruction']}"
    return text + (f"\n{extra}" if extra else "")


def format_prompt(entry: Mapping[str, str], style: str = "alpaca") -> str:
    """The text a model continues to answer ``entry``: its input followed by the response marker."""
    return format_input(entry, style) + _RESPONSE_MARKER[style]


def format_example(entry: Mapping[str, str], style: str = "alpaca") -> str:
    """The full training text of ``entry``: its prompt followed by its ``output``."""
    return format_prompt(entry, style) + entry["output"]


def extract_response(text: str, style: str = "alpaca") -> str:
    """The response in a generated ``text``: what follows the first response marker, stripped.

    Like the book's ``text[len(prompt):].replace("### Response:", "").strip()``, later markers
    the model wrote are dropped too; a text without a marker is returned whole, stripped.
    """
    _check_style(style)
    marker = _RESPONSE_MARKER[style].strip()
    before, found, after = text.partition(marker)
    return (after if found else before).replace(marker, "").strip()


# --------------------------------------------------------------------------------------------
# The data file and its split (book 7.2)
# --------------------------------------------------------------------------------------------


class InstructionDataError(ValueError):
    """An instruction file or entry is unusable; the message names the file, the entry and the field."""


def validate_entries(
    data: Any,
    where: str = "the data",
    required: Sequence[str] = ("instruction", "output"),
    optional: Sequence[str] = ("input",),
) -> list[dict[str, Any]]:
    """``data`` checked to be a non-empty list of entries -> the list.

    Every entry must be an object whose ``required`` fields are strings; ``optional`` fields,
    when present, are strings or null. The first problem raises :class:`InstructionDataError`
    naming ``where``, the entry's index and the field.
    """
    if not isinstance(data, list):
        raise InstructionDataError(f"{where}: expected a JSON list of entries, got a {type(data).__name__}")
    if not data:
        raise InstructionDataError(f"{where}: the list of entries is empty")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise InstructionDataError(f"{where}: entry {i} is a {type(entry).__name__}, not an object")
        for field in required:
            if field not in entry:
                raise InstructionDataError(f"{where}: entry {i} has no {field!r} field")
            if not isinstance(entry[field], str):
                kind = type(entry[field]).__name__
                raise InstructionDataError(
                    f"{where}: entry {i}, field {field!r} must be a string, got {kind}"
                )
        for field in optional:
            value = entry.get(field)
            if value is not None and not isinstance(value, str):
                kind = type(value).__name__
                raise InstructionDataError(
                    f"{where}: entry {i}, field {field!r} must be a string, got {kind}"
                )
    return data


def load_instruction_data(
    path: str | os.PathLike, required: Sequence[str] = ("instruction", "output")
) -> list[dict[str, Any]]:
    """The entries of a JSON file such as the book's ``instruction-data.json``, each checked
    (see :func:`validate_entries`); an empty or unreadable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InstructionDataError(f"{path}: cannot be read ({e})") from None
    if not text.strip():
        raise InstructionDataError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InstructionDataError(f"{path}: not valid JSON ({e})") from None
    return validate_entries(data, str(path), required)


def split_data(
    data: Sequence[Any], train_frac: float = 0.85, test_frac: float = 0.10, seed: int | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """(train, validation, test) as the book cuts them: the first ``int(N * 0.85)`` entries
    train, the next ``int(N * 0.1)`` test and the rest (5%) validate.

    The book slices the file in order; ``seed`` shuffles it first (NumPy's
    ``default_rng(seed).permutation``), which the book does not do.
    """
    if not (0 < train_frac and 0 <= test_frac and train_frac + test_frac <= 1):
        raise ValueError(
            f"split fractions must be positive and sum to at most 1, got {train_frac}, {test_frac}"
        )
    data = list(data)
    if seed is not None:
        data = [data[i] for i in np.random.default_rng(seed).permutation(len(data))]
    train_portion = int(len(data) * train_frac)
    test_portion = int(len(data) * test_frac)
    train_data = data[:train_portion]
    test_data = data[train_portion : train_portion + test_portion]
    val_data = data[train_portion + test_portion :]
    return train_data, val_data, test_data


# --------------------------------------------------------------------------------------------
# Token ids and batches (book 7.3, exercise 7.2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructionDataset:
    """Each entry's training text as token ids, and the token count of its prompt without the
    response (the book's ``InstructionDataset``, with exercise 7.2's ``instruction_lengths``).

    ``prompt_lengths`` also count the response marker: the answer's tokens start there.
    """

    encoded_texts: tuple[tuple[int, ...], ...]
    instruction_lengths: tuple[int, ...]
    prompt_lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.encoded_texts)

    @classmethod
    def from_entries(
        cls, data: Sequence[Mapping[str, str]], tokenizer: Any = None, style: str = "alpaca"
    ) -> InstructionDataset:
        """Tokenize ``format_example`` of each entry (the book: ``tokenizer.encode(full_text)``)."""
        tokenizer = get_tokenizer() if tokenizer is None else tokenizer
        encoded = tuple(tuple(tokenizer.encode_ordinary(format_example(e, style))) for e in data)
        lengths = tuple(len(tokenizer.encode_ordinary(format_input(e, style))) for e in data)
        prompts = tuple(len(tokenizer.encode_ordinary(format_prompt(e, style))) for e in data)
        return cls(encoded, lengths, prompts)


def bucket_length(length: int, bucket: int | None, cap: int | None = None) -> int:
    """``length`` rounded up to a multiple of ``bucket`` (no rounding when None), at most ``cap``
    but never below ``length``."""
    if not bucket or bucket <= 1:
        return length
    rounded = -(-length // bucket) * bucket
    return max(length, min(rounded, cap)) if cap else rounded


def custom_collate_fn(
    batch: Sequence[Sequence[int]],
    pad_token_id: int = PAD_TOKEN_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    instruction_lengths: Sequence[int] | None = None,
    pad_to: int | None = None,
    pad_rows_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (inputs, targets), each (B, T) int32: the book's ``custom_collate_fn``.

    Each entry gets an end-of-text token and is padded with ``pad_token_id`` to the longest
    entry + 1; inputs drop the last position and targets the first (shifted by one). Of the
    padding targets only the first stays (the model learns to end its answer there); the others
    become ``ignore_index``. ``instruction_lengths`` (exercise 7.2): row ``i``'s first
    ``instruction_lengths[i] - 1`` targets (the prompt's tokens) are ignored too. Then rows are cut to
    ``allowed_max_length``. Beyond the book: ``pad_to`` pads T further and ``pad_rows_to`` adds
    rows, both with inputs ``pad_token_id`` and targets ``ignore_index``, changing no loss.
    """
    if not batch:
        raise ValueError("custom_collate_fn needs at least one entry")
    batch_max_length = max(len(item) + 1 for item in batch)
    T = batch_max_length - 1
    if allowed_max_length is not None:
        T = min(T, allowed_max_length)
    T = max(T, pad_to or 0)
    B = max(len(batch), pad_rows_to or 0)
    inputs = np.full((B, T), pad_token_id, np.int32)
    targets = np.full((B, T), ignore_index, np.int32)
    for i, item in enumerate(batch):
        padded = np.full(batch_max_length, pad_token_id, np.int64)
        padded[: len(item)] = item  # then the end-of-text token and the padding
        row_inputs, row_targets = padded[:-1], padded[1:].copy()
        pads = np.flatnonzero(row_targets == pad_token_id)
        row_targets[pads[1:]] = ignore_index  # all but the first padding target
        if instruction_lengths is not None:
            row_targets[: max(instruction_lengths[i] - 1, 0)] = ignore_index
        n = min(len(row_inputs), T)
        inputs[i, :n], targets[i, :n] = row_inputs[:n], row_targets[:n]
    return inputs, targets


@dataclass(frozen=True, eq=False)
class InstructionLoader(BatchOrder):
    """Batches ``(inputs (B, T), targets (B, T))`` of an :class:`InstructionDataset` (book 7.3).

    The book trains with ``shuffle=True, drop_last=True`` and evaluates with neither; epoch
    ``e``'s order is a function of ``(seed, e)`` (see :class:`jaxgpt.data.BatchOrder`).
    ``allowed_max_length`` cuts rows as the book's collate does (it passes the context length);
    ``mask_instructions`` ignores the prompt's targets (exercise 7.2). ``bucket``: T rounded up
    to a multiple of it (capped at ``allowed_max_length``), and a short batch padded to
    ``batch_size`` rows; None gives the book's shapes exactly.
    """

    dataset: InstructionDataset
    batch_size: int = 8
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 123
    allowed_max_length: int | None = None
    mask_instructions: bool = False
    bucket: int | None = 32

    def __post_init__(self) -> None:
        self.check_batching()
        if self.bucket is not None and (not isinstance(self.bucket, int) or self.bucket < 1):
            raise ValueError(f"bucket must be a positive integer or None, got {self.bucket!r}")
        if self.allowed_max_length is not None and self.allowed_max_length < 1:
            raise ValueError(f"allowed_max_length must be a positive integer, got {self.allowed_max_length}")

    @property
    def num_windows(self) -> int:
        return len(self.dataset)

    def collate(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The batch of dataset rows ``rows``."""
        items = [self.dataset.encoded_texts[r] for r in rows]
        lengths = [self.dataset.instruction_lengths[r] for r in rows] if self.mask_instructions else None
        longest = max(len(item) for item in items)
        if self.allowed_max_length is not None:
            longest = min(longest, self.allowed_max_length)
        pad_to = bucket_length(longest, self.bucket, self.allowed_max_length) if self.bucket else None
        rows_to = self.batch_size if self.bucket else None
        return custom_collate_fn(
            items,
            allowed_max_length=self.allowed_max_length,
            instruction_lengths=lengths,
            pad_to=pad_to,
            pad_rows_to=rows_to,
        )

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows in self.batch_indices(epoch, start):  # (B,)
            yield self.collate(rows)


# --------------------------------------------------------------------------------------------
# Offline measures
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="cfg")
def _loss_sum_and_count(params: Params, cfg: GPTConfig, inputs: Array, targets: Array) -> tuple[Array, Array]:
    """Summed cross-entropy of the targets that are not ignored, and their number; dropout off."""
    logits = GPTModel(cfg).apply({"params": params}, inputs, deterministic=True)  # (B, T, V)
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)  # (B, T)
    return jnp.where(valid, losses, 0.0).sum(), valid.sum()


def response_loss(params: Params, cfg: GPTConfig, loader: InstructionLoader) -> float:
    """Mean loss per token of the reference answers under the model, over all of ``loader``.

    Only the answer's tokens and its end-of-text count: the prompt, with its response marker,
    is ignored whatever ``loader.mask_instructions`` says. A number that needs no judge: lower
    means the model finds the reference answers more likely.
    """
    total, count = 0.0, 0
    for rows in loader.batch_indices(0):
        inputs, targets = loader.collate(rows)
        for i, r in enumerate(rows):  # target t predicts token t + 1: the answer starts at length - 1
            targets[i, : loader.dataset.prompt_lengths[r] - 1] = IGNORE_INDEX
        s, c = _loss_sum_and_count(params, cfg, jnp.asarray(inputs), jnp.asarray(targets))
        total, count = total + float(s), count + int(c)
    return total / count if count else math.nan


# --------------------------------------------------------------------------------------------
# Responses to the test entries (book 7.7)
# --------------------------------------------------------------------------------------------


def response_text(generated_text: str, input_text: str, style: str = "alpaca") -> str:
    """The answer in ``generated_text``, the model's continuation of the prompt ``input_text``:
    the book's ``generated_text[len(input_text):].replace("### Response:", "").strip()``."""
    _check_style(style)
    return generated_text[len(input_text) :].replace(_RESPONSE_MARKER[style].strip(), "").strip()


def generate_responses(
    params: Params,
    cfg: GPTConfig,
    entries: Sequence[Mapping[str, str]],
    style: str = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    tokenizer: Any = None,
    on_batch: Callable[[int, list[str]], None] | None = None,
) -> list[str]:
    """The model's answer to each entry, as the book makes them: greedy continuation of
    ``format_input(entry)`` for at most ``max_new_tokens`` tokens, stopping at end-of-text
    (50256), then :func:`response_text`.

    ``batch_size`` entries are generated together (left-padded, which changes no answer);
    ``on_batch(start, responses)`` hears each batch's answers as soon as they exist, so a
    caller can save them before the next batch starts.
    """
    tokenizer = get_tokenizer() if tokenizer is None else tokenizer
    responses: list[str] = []
    for start in range(0, len(entries), batch_size):
        chunk = entries[start : start + batch_size]
        input_texts = [format_input(entry, style) for entry in chunk]
        prompts = [tokenizer.encode_ordinary(text) for text in input_texts]
        outputs = generate_ragged(params, cfg, prompts, max_new_tokens, eos_id=PAD_TOKEN_ID)
        batch = [
            response_text(tokenizer.decode(ids), text, style)
            for ids, text in zip(outputs, input_texts, strict=True)
        ]
        responses += batch
        if on_batch is not None:
            on_batch(start, batch)
    return responses


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename, so the
    file is always either the old one or the new one, never half written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=4)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a plain file's mode, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Scoring by a larger model (book 7.8)
# --------------------------------------------------------------------------------------------

OLLAMA_URL = "http://localhost:11434/api/chat"


class JudgeError(RuntimeError):
    """The judge could not be asked, or its answer could not be read; the message names its URL."""


def judge_endpoint(url: str) -> tuple[str, str]:
    """(full URL, ``"ollama"`` or ``"openai"``) for a judge address.

    ``http://host:11434`` (no path) -> Ollama's ``/api/chat``; a path ending in ``/v1`` ->
    ``/v1/chat/completions``; a path ending in ``/chat/completions`` is OpenAI's API, any other
    path is taken as Ollama's chat endpoint, as the book's ``query_model`` takes it.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise JudgeError(f"judge URL {url!r} is not an http:// or https:// address")
    path = parts.path.rstrip("/")
    if path == "":
        path = "/api/chat"
    elif path.endswith("/v1"):
        path += "/chat/completions"
    api = "openai" if path.endswith("/chat/completions") else "ollama"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")), api


def query_model(prompt: str, model: str = "llama3", url: str = OLLAMA_URL, timeout: float = 300.0) -> str:
    """The judge's reply to ``prompt``, with the book's deterministic settings (seed 123,
    temperature 0, a 2048-token context): the book's ``query_model``.

    Ollama answers in JSON lines, one piece of the message each, which are joined; an
    OpenAI-compatible endpoint answers in one JSON object. Standard library only.
    """
    url, api = judge_endpoint(url)
    messages = [{"role": "user", "content": prompt}]
    if api == "ollama":
        data = {
            "model": model,
            "messages": messages,
            "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
        }
    else:
        data = {"model": model, "messages": messages, "seed": 123, "temperature": 0, "stream": False}
    request = urllib.request.Request(url, data=json.dumps(data).encode("utf-8"), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace").strip()[:200]
        raise JudgeError(f"the judge at {url} answered HTTP {e.code} ({detail or e.reason})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise JudgeError(f"the judge at {url} does not answer ({reason})") from None
    try:
        if api == "openai":
            return json.loads(body)["choices"][0]["message"]["content"]
        return "".join(json.loads(line)["message"]["content"] for line in body.splitlines() if line.strip())
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise JudgeError(
            f"the judge at {url} sent an answer that is not {api}'s chat format ({e!r})"
        ) from None


def scoring_prompt(entry: Mapping[str, str], json_key: str = "model_response") -> str:
    """The book's request to grade ``entry[json_key]`` against the reference output, 0 to 100."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def check_judge(url: str, model: str = "llama3", timeout: float = 60.0) -> None:
    """Raise :class:`JudgeError` unless the judge at ``url`` answers a short request with ``model``."""
    query_model("Respond with the integer 1 only.", model, url, timeout)


def score_response(
    entry: Mapping[str, str], json_key: str = "model_response", model: str = "llama3", url: str = OLLAMA_URL
) -> tuple[int | None, str]:
    """(score, the judge's raw reply) for one entry; the score is None when the reply is not an integer."""
    reply = query_model(scoring_prompt(entry, json_key), model, url)
    try:
        return int(reply.strip()), reply
    except ValueError:
        return None, reply


def generate_model_scores(
    json_data: Sequence[Mapping[str, str]],
    json_key: str = "model_response",
    model: str = "llama3",
    url: str = OLLAMA_URL,
    print_fn: Callable[[str], None] | None = print,
) -> list[int]:
    """The judge's integer score of each entry's ``json_key`` answer, skipping (and printing) the
    replies that are not integers: the book's ``generate_model_scores``.

    Every entry is checked first: one without ``instruction``, ``output`` or a string
    ``json_key`` raises :class:`InstructionDataError` naming it before the judge is asked.
    """
    validate_entries(list(json_data), "the answers", required=("instruction", "output", json_key))
    scores = []
    for entry in json_data:
        score, reply = score_response(entry, json_key, model, url)
        if score is None:
            if print_fn is not None:
                print_fn(f"Could not convert score: {reply}")
            continue
        scores.append(score)
    return scores
