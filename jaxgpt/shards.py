"""Token shards for corpora larger than memory: prepare once, then read only the windows needed.

``prepare_shards`` tokenizes text files into ``uint16`` shards plus a ``manifest.json``;
``open_shards`` checks them and ``ShardWindows`` / ``ShardLoader`` read the book's sliding
windows from them without ever loading the corpus.

The token stream. A prepared dataset is *one* token sequence, stored in pieces:
  * one input file: exactly ``tokenizer.encode(text, allowed_special={"<|endoftext|>"})``;
  * several files (sorted paths; a directory's ``*.txt`` files in sorted order): each file's
    tokens, with one ``<|endoftext|>`` between neighbouring files (the book's document separator).
Shards are storage only: a window that crosses the end of one shard simply continues in the
next, so the windows are exactly ``sliding_windows(stream, max_length, stride)``.

Parallel tokenization. A file is cut into chunks at a newline that has a non-space character
on each side; GPT-2's pre-tokenizer always makes such a ``"\\n"`` a token of its own, so
tokenizing the chunks separately gives the same tokens as tokenizing the whole text. A file
with no such newline is tokenized in one piece. Each chunk becomes one shard, so the shards do
not depend on the number of worker processes.

Directory layout::

    plan.json             inputs, chunk boundaries, tokenizer identity (written first)
    shard_000000.bin      raw little-endian uint16 token ids
    shard_000000.json     completion marker: token count and sha256 (written after the .bin)
    ...
    manifest.json         written last: every shard's token count and sha256, total tokens

Every file is written to a temporary name and renamed, so an interrupted run leaves only whole
files behind, and running again resumes by skipping chunks whose marker and ``.bin`` agree.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from jaxgpt.data import BatchOrder
from jaxgpt.tokenizer import BPE_FILES, EOT_ID, EOT_TEXT, get_tokenizer

FORMAT = "jaxgpt-token-shards"
VERSION = 1
DTYPE = np.dtype("<u2")  # uint16: GPT-2's 50,257 ids fit
DEFAULT_CHUNK_BYTES = 32 * 2**20  # ~8M tokens, a 16 MB shard


class ShardError(ValueError):
    """A prepared dataset is missing, incomplete, corrupt or made with another tokenizer."""


# ----------------------------------------------------------------------------------------------
# Small helpers: hashing, atomic writes, tokenizer identity
# ----------------------------------------------------------------------------------------------


def _sha256_file(path: Path, block: int = 8 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json_atomic(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def tokenizer_identity(tokenizer: tiktoken.Encoding) -> dict[str, Any]:
    """What a dataset records about the tokenizer that made it.

    Name, vocabulary size and a sha256 over the pre-tokenizer pattern, every (token bytes, id)
    pair and the special tokens, so two encodings agree only if they tokenize identically. The
    GPT-2 encoding also records the sha256 pins of its BPE files.
    """
    digest = hashlib.sha256(tokenizer._pat_str.encode())
    for token, rank in sorted(tokenizer._mergeable_ranks.items(), key=lambda kv: kv[1]):
        digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    for text, rank in sorted(tokenizer._special_tokens.items()):
        digest.update(rank.to_bytes(4, "little") + text.encode())
    ident: dict[str, Any] = {
        "name": tokenizer.name,
        "n_vocab": tokenizer.n_vocab,
        "sha256": digest.hexdigest(),
    }
    if tokenizer.name == "gpt2":
        ident["bpe_files"] = {name: sha for name, (_, sha) in BPE_FILES.items()}
    return ident


# ----------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------


def list_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The text files named by ``inputs`` (files, or directories searched for ``*.txt``), in order."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ValueError("no input given: name a text file, several files, or a directory of .txt files")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir() and is_shard_dir(path) and not (path / "manifest.json").is_file():
            raise ShardError(_incomplete(path))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"directory {path} contains no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    empty = [str(p) for p in files if p.stat().st_size == 0]
    if empty:
        raise ValueError(f"empty input file(s): {empty}")
    unreadable = [str(p) for p in files if not os.access(p, os.R_OK)]
    if unreadable:
        raise PermissionError(f"input file(s) cannot be read (permission denied): {unreadable}")
    return files


def _is_space_at(data: bytes, pos: int, backwards: bool) -> bool:
    """Is the UTF-8 character ending just before ``pos`` (backwards) / starting at ``pos`` whitespace?"""
    if backwards:
        start = pos - 1
        while start > 0 and data[start] & 0xC0 == 0x80:  # step over continuation bytes
            start -= 1
        raw = data[start:pos]
    else:
        end = pos + 1
        while end < len(data) and data[end] & 0xC0 == 0x80:
            end += 1
        raw = data[pos:end]
    char = raw.decode("utf-8", errors="replace")
    return char.isspace() or char == "\ufffd"


def _find_boundary(f: Any, pos: int, size: int, block: int = 1 << 16) -> int | None:
    """First offset after ``pos`` that follows a ``"\\n"`` with a non-space character on each side."""
    while pos < size:
        base = max(pos - 4, 0)  # 4 bytes of context: the previous UTF-8 character
        f.seek(base)
        data = f.read(pos - base + block + 4)
        at_eof = base + len(data) >= size
        limit = len(data) if at_eof else len(data) - 4  # keep 4 bytes for the next character
        i = data.find(b"\n", pos - base)
        while i != -1 and i < limit:
            q = base + i
            if (
                0 < q
                and q + 1 < size
                and not _is_space_at(data, i, True)
                and not _is_space_at(data, i + 1, False)
            ):
                return q + 1
            i = data.find(b"\n", i + 1)
        if at_eof:
            return None
        pos = base + limit
    return None


def _chunk_ends(path: Path, chunk_bytes: int) -> list[int]:
    """Byte offsets where the chunks of ``path`` end (the last is the file size).

    A chunk ends just after the first ``"\\n"`` past each ``chunk_bytes`` whose neighbours are
    both non-space characters. Reads only small windows of the file.
    """
    size = path.stat().st_size
    ends: list[int] = []
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            found = _find_boundary(f, target, size)
            if found is None:
                break
            ends.append(found)
            target = found + chunk_bytes
    ends.append(size)
    return ends


def plan_chunks(files: Sequence[Path], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[dict[str, Any]]:
    """Every chunk as ``{"file", "start", "end", "eot"}``; ``eot`` = append the document separator."""
    _check_positive("chunk_bytes", chunk_bytes)
    chunks = []
    for n, path in enumerate(files):
        start = 0
        ends = _chunk_ends(path, chunk_bytes)
        for k, end in enumerate(ends):
            last_of_file = k == len(ends) - 1
            chunks.append(
                {
                    "file": str(path.resolve()),
                    "start": start,
                    "end": end,
                    "eot": last_of_file and n < len(files) - 1,
                }
            )
            start = end
    return chunks


_WORKER_TOKENIZER: tiktoken.Encoding | None = None


def _tokenize_chunk(
    out_dir: str, index: int, chunk: dict[str, Any], tokenizer: tiktoken.Encoding | None
) -> dict:
    """Worker: tokenize one chunk into ``shard_{index}.bin`` and write its completion marker."""
    global _WORKER_TOKENIZER
    if tokenizer is None:
        if _WORKER_TOKENIZER is None:
            _WORKER_TOKENIZER = get_tokenizer()
        tokenizer = _WORKER_TOKENIZER
    with open(chunk["file"], "rb") as f:
        f.seek(chunk["start"])
        raw = f.read(chunk["end"] - chunk["start"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{chunk['file']} is not valid UTF-8 (byte {chunk['start'] + err.start}): {err.reason}"
        ) from None
    ids = tokenizer.encode(text, allowed_special={EOT_TEXT})
    if chunk["eot"]:
        ids.append(EOT_ID)
    tokens = np.asarray(ids, dtype=DTYPE)
    out = Path(out_dir)
    data = tokens.tobytes()
    _write_atomic(out / _bin_name(index), data)
    marker = {"tokens": int(tokens.size), "sha256": hashlib.sha256(data).hexdigest(), "bytes_in": len(raw)}
    _write_json_atomic(out / _marker_name(index), marker)
    return marker


def _bin_name(index: int) -> str:
    return f"shard_{index:06d}.bin"


def _marker_name(index: int) -> str:
    return f"shard_{index:06d}.json"


def _done_marker(out: Path, index: int) -> dict | None:
    """The marker of a finished shard, or None when the shard must be (re)made."""
    marker_path, bin_path = out / _marker_name(index), out / _bin_name(index)
    if not (marker_path.is_file() and bin_path.is_file()):
        return None
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError):
        return None
    if bin_path.stat().st_size != marker.get("tokens", -1) * DTYPE.itemsize:
        return None
    return marker


def _check_output_dir(out: Path) -> None:
    """Raise unless ``out`` is a directory, or one that can be made, that this process may write."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output directory {out} is a file")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"output directory {out} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {out} cannot be written: {parent} is not writable")


def _remove_prepared_files(out: Path) -> None:
    """Delete what preparation writes into ``out`` (plan, shards, markers, manifest, temporaries)."""
    for pattern in ("shard_*", "plan.json*", "manifest.json*"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it stops the pool and says so once)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare_shards(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    num_workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    tokenizer: tiktoken.Encoding | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out_dir`` as uint16 shards with a manifest; returns the manifest.

    ``num_workers`` processes (default: CPU count, at most the number of chunks) tokenize one
    chunk each at a time; a tqdm bar counts input bytes. Re-running after an interruption keeps
    the finished shards. An unfinished attempt with other inputs (say, a file fixed since it
    failed) is started again; a *finished* different dataset (other inputs, chunking or
    tokenizer) is an error unless ``overwrite`` is set, which deletes its shards first.
    ``tokenizer`` None means the GPT-2 tokenizer (each worker builds its own).

    Bad input raises before any tokenizing: FileNotFoundError / ValueError for the inputs,
    NotADirectoryError / PermissionError / FileExistsError for ``out_dir``; text that is not
    UTF-8 raises ValueError when its chunk is reached. A run that fails leaves nothing in a
    directory that was empty, except the finished shards of an interrupted or failed-to-write run.
    """
    files = list_inputs(inputs)
    out = Path(out_dir)
    _check_output_dir(out)
    ident = tokenizer_identity(tokenizer or get_tokenizer())
    if ident["n_vocab"] > np.iinfo(DTYPE).max + 1:
        raise ValueError(f"tokenizer has {ident['n_vocab']} ids; uint16 shards hold at most 65536")
    chunks = plan_chunks(files, chunk_bytes)
    sources = [
        {"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files
    ]
    plan = {"format": FORMAT, "version": VERSION, "tokenizer": ident, "sources": sources, "chunks": chunks}
    plan["dataset_id"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    fresh = created or not any(out.iterdir())
    if plan_path.exists():
        try:
            old_id = json.loads(plan_path.read_text()).get("dataset_id")
        except (OSError, ValueError, AttributeError):
            old_id = None  # a damaged plan: nothing in it can be trusted
        if old_id != plan["dataset_id"]:
            if (out / "manifest.json").is_file() and not overwrite:
                raise FileExistsError(
                    f"{out} already holds a different prepared dataset (its inputs, chunking or tokenizer "
                    "differ); choose another directory or pass overwrite=True (--overwrite) to replace it"
                )
            _remove_prepared_files(out)  # an unfinished attempt with other inputs, or overwrite
    elif not fresh:
        raise FileExistsError(f"{out} is not empty and holds no prepared dataset; choose an empty directory")
    try:
        return _tokenize_all(out, files, plan, chunks, sources, ident, num_workers, tokenizer, progress)
    except BaseException as err:
        finished = any(out.glob("shard_*.json"))
        if fresh and not (finished and not isinstance(err, ValueError)):
            _remove_prepared_files(out)  # nothing worth resuming: leave the directory as it was
            if created:
                out.rmdir()
        raise


def _tokenize_all(
    out: Path,
    files: list[Path],
    plan: dict[str, Any],
    chunks: list[dict[str, Any]],
    sources: list[dict[str, Any]],
    ident: dict[str, Any],
    num_workers: int | None,
    tokenizer: tiktoken.Encoding | None,
    progress: bool,
) -> dict[str, Any]:
    """The work of :func:`prepare_shards` once ``out`` is ready: plan, shards, manifest."""
    _write_json_atomic(out / "plan.json", plan)

    markers: dict[int, dict] = {}
    todo = []
    for i in range(len(chunks)):
        marker = _done_marker(out, i)
        if marker is None:
            todo.append(i)
        else:
            markers[i] = marker

    from tqdm.auto import tqdm

    total_bytes = sum(c["end"] - c["start"] for c in chunks)
    done_bytes = sum(chunks[i]["end"] - chunks[i]["start"] for i in markers)
    bar = tqdm(
        total=total_bytes,
        initial=done_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=not progress,
    )
    workers = min(num_workers or os.cpu_count() or 1, max(len(todo), 1))
    try:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                markers[i] = _tokenize_chunk(str(out), i, chunks[i], tokenizer)
                bar.update(chunks[i]["end"] - chunks[i]["start"])
        else:
            # spawn: the parent may have started JAX's threads, which fork() must not copy
            context = multiprocessing.get_context("spawn")
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_ignore_sigint
            )
            with pool:
                futures = {pool.submit(_tokenize_chunk, str(out), i, chunks[i], tokenizer): i for i in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        i = futures[future]
                        markers[i] = future.result()
                        bar.update(chunks[i]["end"] - chunks[i]["start"])
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # the chunks under way finish; no new ones start
                    raise
    finally:
        bar.close()

    shards = [
        {"file": _bin_name(i), "tokens": markers[i]["tokens"], "sha256": markers[i]["sha256"]}
        for i in range(len(chunks))
    ]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dataset_id": plan["dataset_id"],
        "dtype": "uint16",
        "tokenizer": ident,
        "separator": EOT_ID if len(files) > 1 else None,
        "sources": sources,
        "shards": shards,
        "total_tokens": sum(s["tokens"] for s in shards),
    }
    _write_json_atomic(out / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def is_shard_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory that ``prepare_shards`` wrote: a finished dataset
    (``manifest.json``) or an incomplete one (``plan.json`` only; ``open_shards`` says so)."""
    path = Path(path)
    return (path / "manifest.json").is_file() or (path / "plan.json").is_file()


def _incomplete(directory: Path) -> str:
    return (
        f"{directory} is an incomplete prepared dataset (its preparation stopped before the end): "
        "run scripts/prepare.py again with the same inputs to finish it"
    )


class TokenShards:
    """The token stream of a prepared dataset, read from its shards on demand.

    ``len(shards)`` is the number of tokens; ``shards[a:b]`` copies tokens a..b-1 (int32) out of
    however many shards they span. By default each slice is read with ``os.pread``: the data
    lives in the OS page cache, never in this process, so its resident memory stays flat however
    large the corpus and however long training runs. ``use_mmap=True`` memory-maps the shards
    instead (also fine; but every page a random window touches then counts towards the
    process's RSS as file-backed memory until the kernel reclaims it).
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], use_mmap: bool = False):
        self.directory = directory
        self.manifest = manifest
        self.use_mmap = use_mmap
        counts = [s["tokens"] for s in manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # (n_shards + 1,)
        self._paths = [directory / s["file"] for s in manifest["shards"]]
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _read(self, k: int, lo: int, n: int) -> np.ndarray:
        """n tokens of shard k from token lo on."""
        if self.use_mmap:
            if k not in self._maps:
                self._maps[k] = np.memmap(self._paths[k], dtype=DTYPE, mode="r")
            return self._maps[k][lo : lo + n]
        fd = os.open(self._paths[k], os.O_RDONLY)
        try:
            raw = os.pread(fd, n * DTYPE.itemsize, lo * DTYPE.itemsize)
        finally:
            os.close(fd)
        if len(raw) != n * DTYPE.itemsize:
            raise ShardError(f"shard {self._paths[k]} is shorter than its manifest says (changed on disk?)")
        return np.frombuffer(raw, dtype=DTYPE)

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("TokenShards supports contiguous slices only, e.g. shards[a:b]")
        start, stop, _ = item.indices(len(self))
        out = np.empty(max(stop - start, 0), dtype=np.int32)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:  # a slice that crosses a shard's end continues in the next shard
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            take = min(stop, hi) - pos
            if take > 0:
                out[pos - start : pos - start + take] = self._read(k, pos - lo, take)
            pos += take
            k += 1
        return out


def write_token_shards(
    tokens: Iterator[np.ndarray] | Sequence[np.ndarray],
    out_dir: str | os.PathLike,
    tokenizer: tiktoken.Encoding | None = None,
    description: str = "pre-tokenized",
) -> dict[str, Any]:
    """Store already-tokenized arrays (one shard each) as a prepared dataset; returns the manifest.

    For token ids made elsewhere (another pipeline, or synthetic data for benchmarks). The ids
    must come from ``tokenizer`` (default GPT-2), whose identity the manifest records.
    ``out_dir`` must be empty or absent.
    """
    ident = tokenizer_identity(tokenizer or get_tokenizer())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose an empty directory")
    shards = []
    digest = hashlib.sha256(description.encode())
    for i, array in enumerate(tokens):
        array = np.asarray(array)
        if array.ndim != 1 or array.size and (array.min() < 0 or array.max() >= ident["n_vocab"]):
            raise ValueError(f"shard {i}: token ids must be 1-D and in [0, {ident['n_vocab']})")
        data = array.astype(DTYPE).tobytes()
        _write_atomic(out / _bin_name(i), data)
        sha = hashlib.sha256(data).hexdigest()
        digest.update(sha.encode())
        shards.append({"file": _bin_name(i), "tokens": int(array.size), "sha256": sha})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dataset_id": digest.hexdigest(),
        "dtype": "uint16",
        "tokenizer": ident,
        "separator": None,
        "sources": [{"description": description}],
        "shards": shards,
        "total_tokens": sum(s["tokens"] for s in shards),
    }
    _write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _describe(ident: dict[str, Any]) -> str:
    return f"{ident['name']!r} ({ident['n_vocab']} ids, sha256 {ident['sha256'][:12]}...)"


def open_shards(
    directory: str | os.PathLike,
    tokenizer: tiktoken.Encoding | None = None,
    verify: bool = True,
    use_mmap: bool = False,
) -> TokenShards:
    """Open a prepared dataset after checking it, so that training never starts on bad data.

    Checks: a manifest exists and is complete; it was made with ``tokenizer`` (default GPT-2);
    every shard file exists with exactly its manifest size; and, with ``verify``, every shard's
    sha256 (reads the whole dataset once). Each failure is a ``ShardError`` naming the file.
    """
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        if (directory / "plan.json").is_file():
            raise ShardError(_incomplete(directory))
        hint = "make one with scripts/prepare.py"
        raise ShardError(f"no manifest.json in {directory}: not a prepared token dataset ({hint})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise ShardError(f"{manifest_path} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(
            f"{manifest_path} has format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
    expected = tokenizer_identity(tokenizer or get_tokenizer())
    if manifest["tokenizer"] != expected:
        raise ShardError(
            f"{directory} was tokenized with {_describe(manifest['tokenizer'])} but training uses "
            f"{_describe(expected)}; "
            "prepare the data again with the training tokenizer"
        )
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        want = shard["tokens"] * DTYPE.itemsize
        if not path.is_file():
            raise ShardError(f"shard {path} listed in the manifest is missing")
        have = path.stat().st_size
        if have != want:
            raise ShardError(
                f"shard {path} is truncated or corrupt: {have} bytes, the manifest says {want} "
                f"({shard['tokens']} tokens)"
            )
    if verify:
        for shard in manifest["shards"]:
            path = directory / shard["file"]
            actual = _sha256_file(path)
            if actual != shard["sha256"]:
                raise ShardError(
                    f"shard {path} is corrupt: sha256 {actual}, the manifest says {shard['sha256']}"
                )
    return TokenShards(directory, manifest, use_mmap=use_mmap)


@dataclass(frozen=True, eq=False)
class ShardWindows:
    """The sliding windows of tokens ``[start, stop)`` of a stream, read on demand.

    Window ``i`` is tokens ``start + i*stride ... + max_length`` (input) and the same moved one
    token on (target): exactly ``sliding_windows(tokens[start:stop], max_length, stride)``.
    ``start``/``stop`` give a train/validation split of the stream by tokens.
    """

    tokens: TokenShards | np.ndarray
    max_length: int
    stride: int
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        _check_positive("max_length", self.max_length)
        _check_positive("stride", self.stride)
        stop = len(self.tokens) if self.stop is None else self.stop
        if not 0 <= self.start <= stop <= len(self.tokens):
            raise ValueError(
                f"need 0 <= start <= stop <= {len(self.tokens)}, got start={self.start}, stop={stop}"
            )
        object.__setattr__(self, "stop", stop)
        if stop - self.start < self.max_length + 1:
            raise ValueError(
                f"too few tokens: {stop - self.start}, but one window of max_length={self.max_length} "
                f"needs at least {self.max_length + 1}"
            )

    def __len__(self) -> int:
        span = self.stop - self.start - self.max_length
        return -(-span // self.stride)  # ceil, as len(range(0, span, stride))

    def rows(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (len(indices), max_length) int32."""
        T = self.max_length
        x = np.empty((len(indices), T), dtype=np.int32)
        y = np.empty((len(indices), T), dtype=np.int32)
        for r, i in enumerate(np.asarray(indices)):
            a = self.start + int(i) * self.stride
            piece = self.tokens[a : a + T + 1]  # (T + 1,)
            x[r], y[r] = piece[:-1], piece[1:]
        return x, y


@dataclass(frozen=True, eq=False)
class ShardLoader(BatchOrder):
    """Batches of windows from shards, in the same order as ``jaxgpt.data.DataLoader``.

    Same interface (``len``, ``order(epoch)``, ``iter_epoch(epoch, start)``), both being a
    ``jaxgpt.data.BatchOrder``, so for the same tokens the two loaders give identical batches,
    and ``(epoch, batch index)`` is the whole data position a checkpoint needs. The permutation
    costs 8 bytes per window of memory.

    With several processes, each yields only its rows of every global batch: process ``p`` of
    ``P`` gets rows ``p*B/P : (p+1)*B/P`` (``batch_size`` is the global B).
    """

    windows: ShardWindows
    batch_size: int
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        self.check_batching()
        _check_positive("process_count", self.process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index must be in [0, {self.process_count}), got {self.process_index}")
        if self.batch_size % self.process_count:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by process_count {self.process_count}"
            )
        if self.process_count > 1 and not self.drop_last:
            raise ValueError("drop_last=False is not supported with several processes (batches must be full)")

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield this process's part ``(x, y)`` of batches ``start, start+1, ...`` of ``epoch``."""
        local = self.batch_size // self.process_count
        for rows in self.batch_indices(epoch, start):  # (B,)
            if self.process_count > 1:
                rows = rows[self.process_index * local : (self.process_index + 1) * local]
            yield self.windows.rows(rows)


def shard_loaders(
    directory: str | os.PathLike,
    batch_size: int,
    max_length: int,
    stride: int,
    train_ratio: float = 0.9,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    verify: bool = True,
    tokenizer: tiktoken.Encoding | None = None,
) -> tuple[ShardLoader, ShardLoader]:
    """Train and validation loaders over a prepared dataset, split by tokens at ``train_ratio``.

    The book splits the *text* 90/10 before tokenizing; a stream too large to hold is split by
    token position instead (``int(train_ratio * n_tokens)``). Train is shuffled and drops a last
    short batch; validation keeps its order and, with one process, every window.
    """
    tokens = open_shards(directory, tokenizer=tokenizer, verify=verify)
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be strictly between 0 and 1, got {train_ratio!r}")
    split = int(train_ratio * len(tokens))
    train = ShardWindows(tokens, max_length, stride, 0, split)
    val = ShardWindows(tokens, max_length, stride, split, len(tokens))
    common = {"seed": seed, "process_index": process_index, "process_count": process_count}
    return (
        ShardLoader(train, batch_size, shuffle=True, drop_last=True, **common),
        ShardLoader(val, batch_size, shuffle=False, drop_last=process_count > 1, **common),
    )
