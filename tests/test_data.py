"""Tests for jaxgpt.data: sliding windows, the batch loader, splits and the corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxgpt.data import (
    DataError,
    DataLoader,
    create_dataloader,
    default_corpus,
    load_corpus,
    prepare_data,
    sliding_windows,
    train_val_split,
)
from jaxgpt.tokenizer import EOT_ID, get_tokenizer
from jaxgpt.train import TrainConfig

IDS_20 = list(range(20))


def _loader(n_windows: int, **kwargs: object) -> DataLoader:
    """A loader over ``n_windows`` windows of 3 tokens; window i's first token is 10 * i."""
    inputs = (np.arange(n_windows)[:, None] * 10 + np.arange(3)).astype(np.int32)
    return DataLoader(inputs, inputs + 1, **kwargs)


def test_sliding_windows_known_sequence() -> None:
    inputs, targets = sliding_windows(IDS_20, max_length=4, stride=2)
    expected_inputs = np.array(
        [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9],
         [8, 9, 10, 11], [10, 11, 12, 13], [12, 13, 14, 15], [14, 15, 16, 17]]
    )  # fmt: skip
    expected_targets = np.array(
        [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 9, 10],
         [9, 10, 11, 12], [11, 12, 13, 14], [13, 14, 15, 16], [15, 16, 17, 18]]
    )  # fmt: skip
    np.testing.assert_array_equal(inputs, expected_inputs)
    np.testing.assert_array_equal(targets, expected_targets)
    assert inputs.dtype == targets.dtype == np.int32


def test_sliding_windows_stride_equal_to_length_does_not_overlap() -> None:
    inputs, targets = sliding_windows(IDS_20, max_length=4, stride=4)
    np.testing.assert_array_equal(inputs, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]])
    np.testing.assert_array_equal(targets, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])


@pytest.mark.parametrize("n_tokens", [5, 9, 20, 101])
@pytest.mark.parametrize(("max_length", "stride"), [(4, 1), (4, 2), (4, 4), (4, 7), (1, 1)])
def test_sliding_windows_match_book_loop(n_tokens: int, max_length: int, stride: int) -> None:
    ids = np.arange(n_tokens) * 3 + 7
    inputs, targets = sliding_windows(ids, max_length, stride)
    # GPTDatasetV1's loop, written out.
    book_starts = list(range(0, n_tokens - max_length, stride))
    assert len(inputs) == len(book_starts) == math.ceil((n_tokens - max_length) / stride)
    for row, start in enumerate(book_starts):
        np.testing.assert_array_equal(inputs[row], ids[start : start + max_length])
        np.testing.assert_array_equal(targets[row], ids[start + 1 : start + max_length + 1])


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_neighbouring_windows_overlap_by_length_minus_stride(stride: int) -> None:
    inputs, _ = sliding_windows(IDS_20, max_length=4, stride=stride)
    overlap = 4 - stride
    np.testing.assert_array_equal(inputs[1:, :overlap], inputs[:-1, stride:])
    np.testing.assert_array_equal(inputs[1:, 0] - inputs[:-1, 0], stride)


def test_too_short_text_says_how_many_tokens_it_has_and_needs() -> None:
    with pytest.raises(ValueError, match=r"has 4 tokens.*needs at least 5"):
        sliding_windows([1, 2, 3, 4], max_length=4, stride=1)
    sliding_windows([1, 2, 3, 4, 5], max_length=4, stride=1)  # exactly enough: one window
    with pytest.raises(ValueError, match=r"has 2 tokens.*needs at least 257"):
        create_dataloader("Hello world", max_length=256)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_length": 0, "stride": 1}, "max_length"),
        ({"max_length": 4, "stride": 0}, "stride"),
        ({"max_length": 2.0, "stride": 1}, "max_length"),
        ({"max_length": 4, "stride": True}, "stride"),
    ],
)
def test_sliding_windows_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sliding_windows(IDS_20, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -2}, "batch_size"),
        ({"batch_size": 2, "seed": -1}, "seed"),
        ({"batch_size": 2, "seed": 1.5}, "seed"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        _loader(5, **kwargs)


def test_loader_without_shuffle_yields_windows_in_order() -> None:
    loader = _loader(5, batch_size=2, shuffle=False, drop_last=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [x[:, 0].tolist() for x, _ in batches] == [[0, 10], [20, 30], [40]]
    for x, y in batches:
        np.testing.assert_array_equal(y, x + 1)
        assert x.dtype == y.dtype == np.int32


def test_drop_last_leaves_out_the_short_batch() -> None:
    loader = _loader(5, batch_size=2, shuffle=False, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    assert all(x.shape == (2, 3) for x, _ in batches)
    assert len(_loader(4, batch_size=2, drop_last=False)) == 2  # nothing to drop
    assert len(_loader(1, batch_size=2, drop_last=True)) == 0


def test_shuffle_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    loader = _loader(50, batch_size=5, seed=7)
    first = np.concatenate([x[:, 0] for x, _ in loader.iter_epoch(0)])
    again = np.concatenate([x[:, 0] for x, _ in _loader(50, batch_size=5, seed=7).iter_epoch(0)])
    other_seed = np.concatenate([x[:, 0] for x, _ in _loader(50, batch_size=5, seed=8)])
    next_epoch = np.concatenate([x[:, 0] for x, _ in loader.iter_epoch(1)])

    np.testing.assert_array_equal(first, again)
    assert sorted(first.tolist()) == list(range(0, 500, 10))
    assert not np.array_equal(first, np.arange(0, 500, 10))
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, next_epoch)


def test_shuffled_batches_keep_inputs_and_targets_paired() -> None:
    for x, y in _loader(20, batch_size=3, seed=1, drop_last=False).iter_epoch(4):
        np.testing.assert_array_equal(y, x + 1)


def test_resuming_at_a_batch_gives_the_remaining_batches() -> None:
    loader = _loader(23, batch_size=4, seed=3)
    full = list(loader.iter_epoch(2))
    resumed = list(loader.iter_epoch(2, start=3))
    assert len(resumed) == len(full) - 3
    for (x_full, y_full), (x_res, y_res) in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(x_full, x_res)
        np.testing.assert_array_equal(y_full, y_res)
    assert list(loader.iter_epoch(2, start=len(loader))) == []
    with pytest.raises(ValueError, match="start"):
        list(loader.iter_epoch(2, start=len(loader) + 1))
    with pytest.raises(ValueError, match="epoch"):
        list(loader.iter_epoch(-1))


def test_create_dataloader_batches_tokenized_text() -> None:
    text = "In the heart of the city stood the old library, a relic from a bygone era. " * 4
    ids = get_tokenizer().encode(text)
    loader = create_dataloader(text, batch_size=2, max_length=4, stride=4, shuffle=False, drop_last=False)
    x, y = next(iter(loader))
    np.testing.assert_array_equal(x, [ids[0:4], ids[4:8]])
    np.testing.assert_array_equal(y, [ids[1:5], ids[5:9]])
    assert len(loader) == math.ceil(math.ceil((len(ids) - 4) / 4) / 2)


def test_create_dataloader_keeps_endoftext_as_one_token() -> None:
    loader = create_dataloader("a <|endoftext|> b c d", batch_size=1, max_length=2, stride=1, shuffle=False)
    assert 50256 in np.concatenate([x.ravel() for x, _ in loader])


def test_train_val_split_cuts_at_ratio() -> None:
    text = "abcdefghij" * 10
    train, val = train_val_split(text)
    assert (train, val) == (text[:90], text[90:])
    train_ids, val_ids = train_val_split(np.arange(7), train_ratio=0.5)
    np.testing.assert_array_equal(train_ids, [0, 1, 2])
    np.testing.assert_array_equal(val_ids, [3, 4, 5, 6])
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="train_ratio"):
            train_val_split(text, train_ratio=bad)


def test_default_corpus_is_deterministic_and_large() -> None:
    from pydoc_data.topics import topics

    corpus = default_corpus()
    assert corpus == default_corpus()
    assert len(corpus) > 400_000
    assert corpus.startswith(topics[sorted(topics)[0]])
    # Enough tokens for a 256-token context with a 90/10 split.
    _, val = train_val_split(corpus)
    assert len(create_dataloader(val, batch_size=2, max_length=256, stride=256)) > 10


def test_load_corpus_joins_documents_with_endoftext_in_path_order(tmp_path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    (tmp_path / "docs" / "skip.md").write_text("not text")
    (tmp_path / "last.txt").write_text("third")
    text = load_corpus([tmp_path / "docs", tmp_path / "last.txt"])
    assert text == "first\n<|endoftext|>\nsecond\n<|endoftext|>\nthird"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: [], "no input given"),
        (lambda d: [d / "missing.txt"], "does not exist"),
        (lambda d: [(d / "sub").mkdir() or d / "sub"], "contains no .txt files"),
        (lambda d: [(d / "blank.txt").write_text(" \n") and d / "blank.txt"], "is empty"),
        (lambda d: [(d / "bad.txt").write_bytes(b"ok \xff") and d / "bad.txt"], "is not UTF-8 text (byte 3"),
    ],
    ids=["nothing", "missing", "no-txt", "blank", "not-utf8"],
)
def test_load_corpus_names_the_bad_file(tmp_path, make, message) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        load_corpus(make(tmp_path))


def test_prepare_data_splits_windows_and_fingerprints() -> None:
    text = default_corpus()[:20_000]
    tcfg = TrainConfig(batch_size=4, seed=3)
    data = prepare_data(text, 32, tcfg)
    tok = get_tokenizer()
    train_text, val_text = text[:18_000], text[18_000:]  # the book's 90/10 split by characters
    assert data.train_tokens == len(tok.encode(train_text)) and data.val_tokens == len(tok.encode(val_text))
    assert data.train_loader.num_windows == math.ceil((data.train_tokens - 32) / 32)
    assert len(data.val_loader) == math.ceil(data.val_loader.num_windows / 4)  # keeps the short batch
    x, y = next(iter(data.val_loader))
    np.testing.assert_array_equal(x[0], tok.encode(val_text)[:32])
    np.testing.assert_array_equal(y[0], tok.encode(val_text)[1:33])
    assert data.fingerprint == prepare_data(text, 32, tcfg).fingerprint
    assert data.fingerprint != prepare_data(text + " more", 32, tcfg).fingerprint
    assert EOT_ID not in x  # no separator in a single document


def test_prepare_data_names_what_does_not_fit() -> None:
    with pytest.raises(DataError, match="corpus too small"):
        prepare_data("Every effort moves you " * 10, 32, TrainConfig())
    with pytest.raises(DataError, match="batch too large: a step takes batch_size x grad_accum = 64 x 4"):
        prepare_data(default_corpus()[:20_000], 32, TrainConfig(batch_size=64, grad_accum=4))
