"""Tests for jaxgpt.tokenizer: the offline GPT-2 BPE (no network is used)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tiktoken.load

from jaxgpt import tokenizer as tok_mod
from jaxgpt.tokenizer import (
    BPE_FILES,
    EOT_ID,
    encoding_from_files,
    get_tokenizer,
    gpt2_bpe_paths,
    text_to_token_ids,
    token_ids_to_text,
)

# Ids from the book (chapters 2 and 5) and tiktoken.get_encoding("gpt2").
BOOK_CASES = [
    ("Hello, I am", [15496, 11, 314, 716]),
    ("Every effort moves you", [6109, 3626, 6100, 345]),
    (
        "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
        [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286,
         617, 34680, 27271, 13],
    ),
]  # fmt: skip


@pytest.fixture
def packaged_files(monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Paths of the packaged BPE files, with tiktoken's cache switched off."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    return gpt2_bpe_paths()


@pytest.mark.parametrize(("text", "ids"), BOOK_CASES)
def test_text_to_token_ids_matches_book(text: str, ids: list[int]) -> None:
    got = text_to_token_ids(text)
    assert got.shape == (1, len(ids))
    assert got.dtype == np.int32
    assert got[0].tolist() == ids


@pytest.mark.parametrize(("text", "ids"), BOOK_CASES)
def test_token_ids_to_text_round_trips(text: str, ids: list[int]) -> None:
    assert token_ids_to_text(ids) == text
    assert token_ids_to_text(np.asarray([ids])) == text
    assert token_ids_to_text(jnp.asarray(ids, dtype=jnp.int32)) == text
    assert token_ids_to_text(text_to_token_ids(text)) == text


def test_endoftext_is_one_token_and_vocab_size_is_gpt2() -> None:
    tokenizer = get_tokenizer()
    assert EOT_ID == 50256
    assert tokenizer.eot_token == EOT_ID
    assert tokenizer.n_vocab == 50257
    assert tokenizer.decode([EOT_ID]) == "<|endoftext|>"


def test_unknown_words_split_into_known_subwords() -> None:
    ids = text_to_token_ids("Akwirw ier")[0].tolist()
    assert ids == [33901, 86, 343, 86, 220, 959]  # the book's exercise 2.1 ids
    assert [get_tokenizer().decode([i]) for i in ids] == ["Ak", "w", "ir", "w", " ", "ier"]


def test_get_tokenizer_is_cached() -> None:
    assert get_tokenizer() is get_tokenizer()


def test_token_ids_to_text_rejects_batches_of_several() -> None:
    with pytest.raises(ValueError, match=r"\(T,\) or \(1, T\)"):
        token_ids_to_text(np.zeros((2, 3), dtype=np.int32))


def test_ranks_equal_tiktokens_own_conversion(
    packaged_files: dict[str, Path],
) -> None:
    # tiktoken's data_gym loader, reading local paths with its cache disabled (no writes, no network).
    expected = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(packaged_files["vocab.bpe"]), str(packaged_files["encoder.json"])
    )
    built = encoding_from_files(packaged_files["vocab.bpe"], packaged_files["encoder.json"])
    assert built._mergeable_ranks == expected


def test_tampered_file_raises_naming_file_and_hashes(packaged_files: dict[str, Path], tmp_path: Path) -> None:
    tampered = tmp_path / "vocab.bpe"
    shutil.copy(packaged_files["vocab.bpe"], tampered)
    with tampered.open("ab") as f:
        f.write(b"x y\n")
    actual = hashlib.sha256(tampered.read_bytes()).hexdigest()

    with pytest.raises(ValueError) as info:
        encoding_from_files(tampered, packaged_files["encoder.json"])
    message = str(info.value)
    assert "vocab.bpe" in message
    assert BPE_FILES["vocab.bpe"][1] in message
    assert actual in message


def test_expected_hash_mismatch_raises(
    packaged_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = BPE_FILES["encoder.json"]
    monkeypatch.setitem(tok_mod.BPE_FILES, "encoder.json", (url, "0" * 64))
    with pytest.raises(ValueError, match=r"encoder\.json.*expected 0{64}, got 1961396"):
        encoding_from_files(packaged_files["vocab.bpe"], packaged_files["encoder.json"])


def test_missing_file_raises_naming_it(packaged_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"encoder\.json"):
        encoding_from_files(packaged_files["vocab.bpe"], tmp_path / "encoder.json")


def _fill_tiktoken_cache(cache: Path, sources: dict[str, Path]) -> dict[str, Path]:
    """Copy the files into ``cache`` under the names tiktoken gives its downloads."""
    cache.mkdir(exist_ok=True)
    placed = {}
    for name, (url, _) in BPE_FILES.items():
        placed[name] = cache / hashlib.sha1(url.encode()).hexdigest()
        shutil.copy(sources[name], placed[name])
    return placed


def test_tiktoken_cache_is_preferred_when_present(
    packaged_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    placed = _fill_tiktoken_cache(tmp_path / "cache", packaged_files)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    assert gpt2_bpe_paths() == placed


def test_corrupt_cache_file_falls_back_to_packaged_copy(
    packaged_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    placed = _fill_tiktoken_cache(tmp_path / "cache", packaged_files)
    placed["vocab.bpe"].write_bytes(b"#version: 0.2\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    paths = gpt2_bpe_paths()
    assert paths["vocab.bpe"] == packaged_files["vocab.bpe"]
    assert paths["encoder.json"] == placed["encoder.json"]


def test_empty_cache_dir_uses_packaged_copy(
    packaged_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert gpt2_bpe_paths() == packaged_files
    assert all(p.parent.name == "data" for p in packaged_files.values())


def test_get_tokenizer_builds_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("get_tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    get_tokenizer.cache_clear()
    try:
        assert get_tokenizer().encode("Hello, I am") == [15496, 11, 314, 716]
    finally:
        get_tokenizer.cache_clear()
