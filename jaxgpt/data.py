"""The book's sliding-window dataset and data loader (chapter 2, section 2.6), in NumPy, and the
corpus of a training run (chapter 5.1.2): text files -> train and validation loaders.

``sliding_windows`` plays the part of ``GPTDatasetV1``: it cuts a token sequence
into input windows of ``max_length`` tokens, ``stride`` tokens apart, with the
targets shifted one token to the right. ``DataLoader`` batches them like
``torch.utils.data.DataLoader`` with ``batch_size``, ``shuffle`` and
``drop_last``, but every epoch's order is a pure function of ``(seed, epoch)``,
so training can stop and resume at any batch and see the same data.

Shapes: ``N`` windows, ``B`` batch size, ``T`` = ``max_length`` tokens per window.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import tiktoken

from jaxgpt.tokenizer import EOT_TEXT, get_tokenizer

if TYPE_CHECKING:  # train.py imports this module: the type only, to avoid the cycle
    from jaxgpt.train import TrainConfig

_Splittable = TypeVar("_Splittable", str, Sequence[int], np.ndarray)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def sliding_windows(
    token_ids: Sequence[int] | np.ndarray, max_length: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``token_ids`` into overlapping (input, target) windows, as ``GPTDatasetV1`` does.

    Window ``i`` is ``token_ids[i*stride : i*stride + max_length]`` and its target
    is the same slice moved one token on. A window starts at every ``stride``-th
    position below ``len(token_ids) - max_length``, so there are
    ``ceil((len(token_ids) - max_length) / stride)`` windows; ``stride <
    max_length`` makes neighbours overlap, ``stride > max_length`` skips tokens.

    Args:
        token_ids: (n,) integer token ids.
        max_length: T, tokens per window.
        stride: distance between the starts of neighbouring windows.

    Returns:
        ``(inputs, targets)``, both (N, T) int32.

    Raises:
        ValueError: for a bad argument, or fewer than ``max_length + 1`` tokens.
    """
    _check_positive_int("max_length", max_length)
    _check_positive_int("stride", stride)
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {ids.shape}")
    n_tokens = ids.shape[0]
    if n_tokens < max_length + 1:
        raise ValueError(
            f"text too short: it has {n_tokens} tokens, but one window of "
            f"max_length={max_length} needs at least {max_length + 1} (max_length + 1)"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")

    starts = np.arange(0, n_tokens - max_length, stride)  # (N,)
    index = starts[:, None] + np.arange(max_length)  # (N, T)
    return ids[index].astype(np.int32), ids[index + 1].astype(np.int32)


class BatchOrder:
    """Which windows each batch of each epoch holds: the indexing every loader inherits.

    ``DataLoader`` (windows in memory) and ``jaxgpt.shards.ShardLoader`` (windows read from
    prepared shards) both build on this, so for the same windows they give the same batches.
    Epoch ``e`` visits the ``num_windows`` windows in the order
    ``default_rng([seed, e]).permutation(N)`` (``0..N-1`` without ``shuffle``), cut into batches
    of ``batch_size``; ``drop_last`` leaves out a last short batch. The order is a pure function
    of ``(seed, epoch)``, so ``(epoch, batch index)`` is the whole data position of a run.
    A loader supplies those five attributes and ``iter_epoch``.
    """

    num_windows: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int

    def check_batching(self) -> None:
        """Raise ValueError for a ``batch_size`` or ``seed`` no epoch can use (for ``__post_init__``)."""
        _check_positive_int("batch_size", self.batch_size)
        _check_non_negative_int("seed", self.seed)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_windows, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self, epoch: int) -> np.ndarray:
        """(N,) the window indices in the order epoch ``epoch`` visits them."""
        _check_non_negative_int("epoch", epoch)
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def batch_indices(self, epoch: int = 0, start: int = 0) -> Iterator[np.ndarray]:
        """(B,) window indices of batches ``start, start+1, ...`` of epoch ``epoch``."""
        _check_non_negative_int("start", start)
        if start > len(self):
            raise ValueError(f"start must be at most {len(self)} (batches per epoch), got {start}")
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The ``(x, y)`` batches of ``batch_indices(epoch, start)``: each loader reads its own."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.iter_epoch(0)


@dataclasses.dataclass(frozen=True, eq=False)
class DataLoader(BatchOrder):
    """Batches of (input, target) windows, as the book's ``create_dataloader_v1`` gives.

    Iterating the loader yields epoch 0. A training loop asks for each epoch by
    number with ``iter_epoch(epoch)``: when ``shuffle`` is on, every epoch has
    its own order, drawn from ``(seed, epoch)`` alone, and ``start`` skips to a
    batch so a resumed run continues exactly where it stopped.

    Attributes:
        inputs: (N, T) int32 input windows.
        targets: (N, T) int32 target windows (inputs shifted by one token).
        batch_size: B, windows per batch.
        shuffle: visit the windows in a fresh random order each epoch.
        drop_last: leave out a last batch smaller than ``batch_size``.
        seed: non-negative integer seed of the shuffling.
    """

    inputs: np.ndarray
    targets: np.ndarray
    batch_size: int
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        inputs, targets = np.asarray(self.inputs), np.asarray(self.targets)
        if inputs.ndim != 2 or inputs.shape != targets.shape:
            raise ValueError(
                f"inputs and targets must both have shape (N, T), got {inputs.shape} and {targets.shape}"
            )
        self.check_batching()
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "targets", targets)

    @property
    def num_windows(self) -> int:
        """N, the number of (input, target) windows."""
        return self.inputs.shape[0]

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield the batches ``(x, y)`` of epoch ``epoch`` from batch index ``start`` on.

        ``x`` and ``y`` are (B, T) int32; with ``drop_last=False`` the last batch
        may have fewer than B rows.
        """
        for rows in self.batch_indices(epoch, start):  # (B,)
            yield self.inputs[rows], self.targets[rows]


def create_dataloader(
    text: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    tokenizer: tiktoken.Encoding | None = None,
) -> DataLoader:
    """Tokenize ``text`` and batch its sliding windows: the book's ``create_dataloader_v1``.

    ``<|endoftext|>`` in the text is kept as one token. See ``sliding_windows``
    and ``DataLoader`` for the arguments; batches are (B, max_length) int32.
    """
    tokenizer = get_tokenizer() if tokenizer is None else tokenizer
    token_ids = tokenizer.encode(text, allowed_special={EOT_TEXT})
    inputs, targets = sliding_windows(token_ids, max_length, stride)
    return DataLoader(inputs, targets, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)


def train_val_split(text_or_ids: _Splittable, train_ratio: float = 0.9) -> tuple[_Splittable, _Splittable]:
    """Split a text (or token sequence) into its first ``train_ratio`` and the rest.

    As in the book's chapter 5: ``split = int(train_ratio * len(data))``, giving
    ``(data[:split], data[split:])``.
    """
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be strictly between 0 and 1, got {train_ratio!r}")
    split = int(train_ratio * len(text_or_ids))
    return text_or_ids[:split], text_or_ids[split:]


def default_corpus() -> str:
    """A built-in English training text: the Python help topics from ``pydoc_data``.

    The standard library ships them (about 465k characters), so a quick start
    needs no download. Topics are joined in sorted order, so the text is the
    same on every run for a given Python version.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


# --------------------------------------------------------------------------------------------
# The corpus of a training run (book 5.1.2)
# --------------------------------------------------------------------------------------------


class DataError(ValueError):
    """The training text or its windows cannot make a run (raised before training starts)."""


def load_corpus(paths: Sequence[str | os.PathLike]) -> str:
    """The UTF-8 text of each file (a directory gives its .txt files, sorted), documents joined
    by ``<|endoftext|>`` as GPT-2's training data separates them.

    Raises DataError naming the file that is missing, unreadable, not UTF-8 or empty.
    """
    from jaxgpt.shards import list_inputs  # shards.py builds on this module: import it late

    try:
        files = list_inputs(paths)
    except (OSError, ValueError) as e:
        raise DataError(str(e)) from e
    texts = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as e:
            raise DataError(f"data file {file} cannot be read: {e.strerror or e}") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"data file {file} is not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r}); "
                "convert it, e.g. with iconv -t utf-8"
            ) from e
        if not text.strip():
            raise DataError(f"data file {file} is empty")
        texts.append(text)
    return f"\n{EOT_TEXT}\n".join(texts)


@dataclasses.dataclass(frozen=True)
class Data:
    """The loaders of a run plus what describes them (stored with the run to check a resume)."""

    train_loader: DataLoader
    val_loader: DataLoader
    train_tokens: int
    val_tokens: int
    fingerprint: str  # sha256 of the train and validation token ids


def prepare_data(text: str, context_length: int, tcfg: TrainConfig) -> Data:
    """Split ``text`` 90/10 (book 5.1.2), tokenize, cut windows of ``context_length`` tokens.

    The training loader shuffles with ``tcfg.seed`` and drops a last short batch; the
    validation loader keeps its order and every window. Raises DataError when either split has
    no window, or the training split has fewer windows than one step needs.
    """
    tokenizer = get_tokenizer()
    train_text, val_text = train_val_split(text, tcfg.train_ratio)
    train_ids = np.asarray(tokenizer.encode(train_text, allowed_special={EOT_TEXT}), np.int32)
    val_ids = np.asarray(tokenizer.encode(val_text, allowed_special={EOT_TEXT}), np.int32)
    stride = context_length if tcfg.stride is None else tcfg.stride
    need = context_length + 1
    if len(train_ids) < need or len(val_ids) < need:
        raise DataError(
            f"corpus too small: the training split has {len(train_ids)} tokens and the validation split "
            f"{len(val_ids)}, but each needs at least context_length + 1 = {need} for one window; "
            "give more text or a smaller --context-length"
        )
    train_x, train_y = sliding_windows(train_ids, context_length, stride)
    val_x, val_y = sliding_windows(val_ids, context_length, stride)
    per_step = tcfg.batch_size * tcfg.grad_accum
    if per_step > len(train_x):
        raise DataError(
            f"batch too large: a step takes batch_size x grad_accum = {tcfg.batch_size} x {tcfg.grad_accum}"
            f" = {per_step} windows, but the training split has only {len(train_x)} windows of "
            f"{context_length} tokens (stride {stride}); lower --batch-size/--grad-accum or give more text"
        )
    digest = hashlib.sha256(train_ids.tobytes() + b"|" + val_ids.tobytes()).hexdigest()
    return Data(
        train_loader=DataLoader(
            train_x, train_y, tcfg.batch_size, shuffle=True, drop_last=True, seed=tcfg.seed
        ),
        val_loader=DataLoader(val_x, val_y, tcfg.batch_size, shuffle=False, drop_last=False),
        train_tokens=len(train_ids),
        val_tokens=len(val_ids),
        fingerprint=digest,
    )
