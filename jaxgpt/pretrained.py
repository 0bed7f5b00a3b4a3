"""OpenAI's GPT-2 by name (Hugging Face's hub) or from the directory the book's ``gpt_download.py`` writes.

``from_pretrained("gpt2")`` fetches ``config.json`` and ``model.safetensors`` of
``openai-community/gpt2`` with ``huggingface_hub`` (its cache, progress bar and offline mode). A
local directory works too: the book's download (``gpt2/124M/``: ``checkpoint``, ``hparams.json``,
``model.ckpt.index``, ``model.ckpt.data-00000-of-00001``, ...) is read here WITHOUT TensorFlow.

TensorFlow's checkpoint ("tensor bundle") format, as far as it is needed:

* ``<prefix>.index`` is a LevelDB-style sorted string table. Its 48-byte footer points at an
  index block, whose entries point at data blocks; every block is followed by a compression byte
  and a masked CRC-32C. Each data block entry maps a tensor name to a ``BundleEntryProto``
  (protobuf: dtype, shape, shard_id, offset, size, masked CRC-32C of the tensor's bytes). The
  empty name holds the ``BundleHeaderProto`` (number of shards, endianness).
* ``<prefix>.data-SSSSS-of-NNNNN`` holds the tensors' raw bytes at those offsets.

OpenAI's names (``model/h0/attn/c_attn/w``, ...) are renamed to Hugging Face's, the leading
1 of TensorFlow's conv1d weights is dropped, and :func:`jaxgpt.weights.params_from_hf` does the
rest, so both routes share one importer and its checks.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.weights import Params, load_hf_gpt2, params_from_hf

# ----------------------------------------------------------------------------- CRC-32C

_CRC_POLY = 0x82F63B78  # Castagnoli, reflected


def _crc_table() -> np.ndarray:
    table = np.zeros(256, np.uint32)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _CRC_POLY if c & 1 else c >> 1
        table[n] = c
    return table


_CRC_TABLE = _crc_table()
_CRC_TABLE_LIST = [int(v) for v in _CRC_TABLE]


def _crc_bytes(reg: int, data: bytes | np.ndarray) -> int:
    """Advance the raw CRC register over ``data`` one byte at a time (for short inputs)."""
    table = _CRC_TABLE_LIST
    for b in bytes(data):
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _apply(matrix: np.ndarray, regs: np.ndarray) -> np.ndarray:
    """Apply a GF(2) 32x32 operator (its 32 columns, uint32) to each register in ``regs``."""
    out = np.zeros_like(regs)
    for bit in range(32):
        out ^= np.where((regs >> np.uint32(bit)) & np.uint32(1), matrix[bit], np.uint32(0))
    return out


def _zeros_operator(n_bytes: int) -> np.ndarray:
    """The operator that advances a raw register over ``n_bytes`` zero bytes (square and multiply)."""
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    step = np.array([_crc_bytes(int(b), b"\0") for b in basis], np.uint32)  # one zero byte
    result = basis.copy()  # identity
    while n_bytes:
        if n_bytes & 1:
            result = _apply(step, result)
        step = _apply(step, step)
        n_bytes >>= 1
    return result


def _word_tables() -> tuple[np.ndarray, np.ndarray]:
    """Tables that advance a register over 4 bytes at once: split by its low and high 16 bits."""
    tables = []
    for shift in (0, 16):
        reg = np.arange(65536, dtype=np.uint32) << np.uint32(shift)
        for _ in range(4):
            reg = _CRC_TABLE[reg & np.uint32(0xFF)] ^ (reg >> np.uint32(8))
        tables.append(reg)
    return tables[0], tables[1]


_WORD_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def crc32c(data: bytes | np.ndarray) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TensorFlow and LevelDB use it.

    Long inputs are cut into many equal chunks whose registers advance together in NumPy, four
    bytes per step; the chunk registers are then folded together with the linear operator that
    shifts a register over a run of zero bytes.
    """
    global _WORD_TABLES
    buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    n_chunks = 1
    while n_chunks < 16384 and n_chunks * 2 * 1024 <= buf.size:
        n_chunks *= 2
    if n_chunks < 64:
        return _crc_bytes(0xFFFFFFFF, buf) ^ 0xFFFFFFFF
    if _WORD_TABLES is None:
        _WORD_TABLES = _word_tables()
    low, high = _WORD_TABLES
    chunk = buf.size // n_chunks // 4 * 4
    body = buf[: n_chunks * chunk].reshape(n_chunks, chunk)
    regs = np.zeros(n_chunks, np.uint32)
    regs[0] = 0xFFFFFFFF  # the initial value only enters through the first chunk
    for start in range(0, chunk, 2048):
        words = np.ascontiguousarray(body[:, start : start + 2048]).view("<u4").T.copy()  # (<=512, n_chunks)
        for word in words:
            x = regs ^ word
            regs = low[x & np.uint32(0xFFFF)] ^ high[x >> np.uint32(16)]
    length = chunk
    while regs.size > 1:  # fold neighbours: reg(A + B) = shift(reg(A), len(B)) ^ reg(B)
        regs = _apply(_zeros_operator(length), regs[0::2]) ^ regs[1::2]
        length *= 2
    reg = _crc_bytes(int(regs[0]), buf[n_chunks * chunk :])
    return reg ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    """LevelDB stores CRCs "masked" (rotated and offset) so CRCs of CRCs stay well spread."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- the .index table


class CheckpointError(ValueError):
    """A TensorFlow checkpoint that cannot be read; the message names the file (and tensor)."""


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CheckpointError(f"{where}: truncated or malformed varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes, where: str) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: ints (varint, fixed) or bytes (length-delimited)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos, where)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise CheckpointError(f"{where}: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise CheckpointError(f"{where}: truncated protobuf message")
        yield field, value


_FOOTER_SIZE = 48
_TABLE_MAGIC = 0xDB4775248B80FB57


def _read_block(data: bytes, handle: bytes, where: str) -> bytes:
    """The contents of the block a BlockHandle (varint offset, varint size) points at, CRC checked."""
    offset, pos = _varint(handle, 0, where)
    size, _ = _varint(handle, pos, where)
    end = offset + size + 5  # contents, then a compression byte and a masked CRC-32C
    if end > len(data):
        raise CheckpointError(f"{where}: truncated (a block ends at byte {end}, the file has {len(data)})")
    contents, kind = data[offset : offset + size], data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if crc32c(data[offset : offset + size + 1]) != _unmask(stored):
        raise CheckpointError(f"{where}: checksum mismatch in the block at byte {offset} (corrupted file)")
    if kind != 0:
        raise CheckpointError(f"{where}: compressed blocks (type {kind}) are not supported")
    return contents


def _block_entries(block: bytes, where: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of a table block: prefix-compressed keys, then restart offsets at the end."""
    if len(block) < 4:
        raise CheckpointError(f"{where}: malformed block")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * n_restarts
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos, where)
        unshared, pos = _varint(block, pos, where)
        value_len, pos = _varint(block, pos, where)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _read_table(path: Path) -> dict[str, bytes]:
    """All entries of a LevelDB-style table file (TensorFlow's ``.index``)."""
    data = path.read_bytes()
    where = str(path)
    if len(data) < _FOOTER_SIZE:
        raise CheckpointError(f"{where}: truncated ({len(data)} bytes, shorter than the table footer)")
    footer = data[-_FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, 40)[0] != _TABLE_MAGIC:
        raise CheckpointError(f"{where}: not a TensorFlow checkpoint index (bad magic number; truncated?)")
    _, pos = _varint(footer, 0, where)  # metaindex handle (offset, size): unused
    _, pos = _varint(footer, pos, where)
    index = _read_block(data, footer[pos:], where)
    entries = {}
    for _, handle in _block_entries(index, where):
        for key, value in _block_entries(_read_block(data, handle, where), where):
            entries[key.decode()] = value
    return entries


# TensorFlow's DataType enum -> NumPy (little-endian): DT_FLOAT, DT_DOUBLE, DT_HALF, DT_INT32, DT_INT64.
_DTYPES = {1: "<f4", 2: "<f8", 19: "<f2", 3: "<i4", 9: "<i8"}


def _parse_entry(value: bytes, where: str) -> dict[str, Any]:
    """A BundleEntryProto: dtype, shape, shard_id, offset, size, crc32c (masked), slices."""
    entry: dict[str, Any] = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": None}
    for field, v in _proto_fields(value, where):
        if field == 1:
            entry["dtype"] = v
        elif field == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            dims = []
            for f, dim in _proto_fields(v, where):
                if f == 2:
                    dims.append(next((int(s) for g, s in _proto_fields(dim, where) if g == 1), 0))
            entry["shape"] = tuple(dims)
        elif field in (3, 4, 5):
            entry[{3: "shard_id", 4: "offset", 5: "size"}[field]] = v
        elif field == 6:
            entry["crc32c"] = v
        elif field == 7:
            raise CheckpointError(f"{where}: partitioned (sliced) variables are not supported")
    return entry


def _checkpoint_prefix(path: Path) -> Path:
    """The checkpoint's file prefix: from the ``checkpoint`` file, else the directory's one ``.index``."""
    state = path / "checkpoint"
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(), re.MULTILINE)
        if match:  # usually relative ("model.ckpt"); an absolute one may point where it was written
            prefix = Path(match.group(1))
            local = path / prefix.name
            if local.with_name(local.name + ".index").is_file() or not prefix.is_absolute():
                return local
            return prefix
    indexes = sorted(path.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise FileNotFoundError(f"{path / 'model.ckpt.index'} not found: the checkpoint's index is missing")
    raise CheckpointError(
        f"{path}: several checkpoints ({', '.join(p.name for p in indexes)}) and no 'checkpoint' file"
    )


def read_tf_checkpoint(prefix: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a TensorFlow (V2) checkpoint as NumPy arrays, read without TensorFlow.

    ``prefix`` is the path without ``.index`` (``gpt2/124M/model.ckpt``). Each tensor's bytes
    are checked against the CRC-32C the writer stored; errors name the file and the tensor.
    """
    prefix = Path(prefix)
    index = prefix.with_name(prefix.name + ".index")
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: the checkpoint's index is missing")
    entries = _read_table(index)
    header = entries.pop("", b"")
    n_shards, endianness = 1, 0
    for field, value in _proto_fields(header, f"{index} (header)"):
        if field == 1:
            n_shards = int(value)
        elif field == 2:
            endianness = int(value)
    if endianness != 0:
        raise CheckpointError(f"{index}: big-endian checkpoints are not supported")

    shards: dict[int, np.ndarray] = {}
    tensors = {}
    for name, value in entries.items():
        entry = _parse_entry(value, f"{index} (tensor {name!r})")
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(
                f"{index}: tensor {name!r} has unsupported TensorFlow dtype {entry['dtype']}"
            )
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shard = prefix.with_name(f"{prefix.name}.data-{entry['shard_id']:05d}-of-{n_shards:05d}")
        if entry["shard_id"] not in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"{shard} not found: the checkpoint's data file is missing")
            shards[entry["shard_id"]] = np.memmap(shard, np.uint8, mode="r") if shard.stat().st_size else b""
        data = shards[entry["shard_id"]]
        start, size = entry["offset"], entry["size"]
        if start + size > len(data):
            raise CheckpointError(
                f"{shard}: truncated: tensor {name!r} needs bytes {start}..{start + size}, "
                f"the file has {len(data)}"
            )
        raw = np.array(data[start : start + size], np.uint8)  # a copy: the file is closed afterwards
        if entry["crc32c"] is not None and crc32c(raw) != _unmask(entry["crc32c"]):
            raise CheckpointError(f"{shard}: checksum mismatch for tensor {name!r} (corrupted file)")
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if size != count * dtype.itemsize:
            raise CheckpointError(
                f"{index}: tensor {name!r} has {size} bytes, its shape {entry['shape']} needs "
                f"{count * dtype.itemsize}"
            )
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors


# ----------------------------------------------------------------------------- OpenAI's layout

_HPARAMS = "hparams.json"
_HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")

# OpenAI's name within a block -> (Hugging Face's name, whether TF stored it as a (1, in, out) conv1d).
_OPENAI_BLOCK = {
    "ln_1/g": ("ln_1.weight", False),
    "ln_1/b": ("ln_1.bias", False),
    "attn/c_attn/w": ("attn.c_attn.weight", True),
    "attn/c_attn/b": ("attn.c_attn.bias", False),
    "attn/c_proj/w": ("attn.c_proj.weight", True),
    "attn/c_proj/b": ("attn.c_proj.bias", False),
    "ln_2/g": ("ln_2.weight", False),
    "ln_2/b": ("ln_2.bias", False),
    "mlp/c_fc/w": ("mlp.c_fc.weight", True),
    "mlp/c_fc/b": ("mlp.c_fc.bias", False),
    "mlp/c_proj/w": ("mlp.c_proj.weight", True),
    "mlp/c_proj/b": ("mlp.c_proj.bias", False),
}


def _openai_shapes(hp: dict[str, int]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """OpenAI tensor name -> (Hugging Face name, shape in the TF checkpoint) for these hparams."""
    C = hp["n_embd"]
    block_shapes = {
        "ln_1/g": (C,), "ln_1/b": (C,), "ln_2/g": (C,), "ln_2/b": (C,),
        "attn/c_attn/w": (1, C, 3 * C), "attn/c_attn/b": (3 * C,),
        "attn/c_proj/w": (1, C, C), "attn/c_proj/b": (C,),
        "mlp/c_fc/w": (1, C, 4 * C), "mlp/c_fc/b": (4 * C,),
        "mlp/c_proj/w": (1, 4 * C, C), "mlp/c_proj/b": (C,),
    }  # fmt: skip
    shapes = {
        "model/wte": ("wte.weight", (hp["n_vocab"], C)),
        "model/wpe": ("wpe.weight", (hp["n_ctx"], C)),
        "model/ln_f/g": ("ln_f.weight", (C,)),
        "model/ln_f/b": ("ln_f.bias", (C,)),
    }
    for i in range(hp["n_layer"]):
        for name, (hf_name, _) in _OPENAI_BLOCK.items():
            shapes[f"model/h{i}/{name}"] = (f"h.{i}.{hf_name}", block_shapes[name])
    return shapes


def read_hparams(path: str | Path) -> dict[str, int]:
    """OpenAI's ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head, n_layer), every key checked."""
    file = Path(path) / _HPARAMS
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: OpenAI's GPT-2 directory needs it")
    try:
        hp = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hp, dict):
        hp = {}
    bad = [k for k in _HPARAM_KEYS if type(hp.get(k)) is not int or hp[k] <= 0]
    if bad:
        raise CheckpointError(
            f"{file}: needs positive integers {', '.join(_HPARAM_KEYS)}; missing or bad: {bad}"
        )
    return {k: hp[k] for k in _HPARAM_KEYS}


def is_openai_checkpoint_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like OpenAI's GPT-2 release, as ``gpt_download.py`` leaves it: a
    directory with ``hparams.json`` or a TensorFlow checkpoint index (``*.index``). Either is
    enough, so that a directory missing the other gets an error naming it."""
    path = Path(path)
    return path.is_dir() and ((path / _HPARAMS).is_file() or any(path.glob("*.index")))


def openai_config(hp: dict[str, int]) -> GPTConfig:
    """The GPTConfig of OpenAI's hparams: GPT-2 as released (biased qkv, tied head)."""
    return GPTConfig(
        vocab_size=hp["n_vocab"],
        context_length=hp["n_ctx"],
        emb_dim=hp["n_embd"],
        n_heads=hp["n_head"],
        n_layers=hp["n_layer"],
        qkv_bias=True,
        tie_embeddings=True,
    )


def load_openai_checkpoint(path: str | Path) -> tuple[GPTConfig, Params]:
    """Read the directory the book's ``gpt_download.py`` writes (``gpt2/124M``), without TensorFlow.

    Every tensor is checked against the shapes ``hparams.json`` implies; a missing, extra or
    misshapen tensor, a missing or truncated file, or a bad checksum raises an error naming it.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no OpenAI GPT-2 directory at {path}")
    hp = read_hparams(path)
    prefix = _checkpoint_prefix(path)
    tensors = read_tf_checkpoint(prefix)
    index, hparams = prefix.name + ".index", path / _HPARAMS
    expected = _openai_shapes(hp)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise CheckpointError(
            f"{path / index}: no tensor {', '.join(missing[:4])}{more}, which {hparams} implies"
        )
    unexpected = sorted(n for n in tensors if n not in expected)
    if unexpected:
        more = f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""
        raise CheckpointError(
            f"{path / index}: unexpected tensor {', '.join(unexpected[:4])}{more}: not part of GPT-2 "
            f"as {hparams} describes it"
        )
    state = {}
    for name, (hf_name, shape) in expected.items():
        if tensors[name].shape != shape:
            raise CheckpointError(
                f"{path / index}: tensor {name!r} has shape {tensors[name].shape}, {hparams} implies {shape}"
            )
        state[hf_name] = tensors[name][0] if len(shape) == 3 else tensors[name]  # conv1d (1, in, out)
    cfg = openai_config(hp)
    return cfg, params_from_hf(state, cfg)


# ----------------------------------------------------------------------------- by name

# Names a user may pass -> the Hugging Face repository holding OpenAI's weights.
PRETRAINED = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
ALIASES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
ALIASES.update({repo: name for name, repo in PRETRAINED.items()})
_HUB_FILES = ("config.json", "model.safetensors")


def pretrained_repo(name: str) -> str | None:
    """The Hugging Face repository of a GPT-2 name (``gpt2``, ``124M``, ``openai-community/gpt2``) or None."""
    name = ALIASES.get(name, name)
    return PRETRAINED.get(name)


def _hub_cache(cache_dir: str | Path | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _download(repo: str, name: str, cache_dir: Any, local_files_only: bool, revision: str | None) -> Path:
    """The local directory holding ``repo``'s config and safetensors, fetched into the hub's cache."""
    from huggingface_hub import hf_hub_download

    paths = []
    for file in _HUB_FILES:
        try:
            paths.append(
                hf_hub_download(
                    repo, file, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
                )
            )
        except Exception as e:  # offline and not cached, network down, no such revision, ...
            book_dir = {v: k for k, v in ALIASES.items() if k.endswith("M")}.get(name, "124M")
            raise FileNotFoundError(
                f"{name}: {repo}/{file} is not in the Hugging Face cache ({_hub_cache(cache_dir)}) and could "
                f"not be downloaded ({type(e).__name__}). Download it once with a network "
                f"(`hf download {repo} config.json model.safetensors`, or this call online), or pass a "
                f"directory instead: the one the book's gpt_download.py writes (gpt2/{book_dir}) or a "
                f"Hugging Face model directory"
            ) from None
    directory = Path(paths[0]).parent
    if Path(paths[1]).parent != directory:  # both files of one snapshot always share a directory
        raise FileNotFoundError(f"{repo}: config.json and model.safetensors came from different snapshots")
    return directory


def is_local_model(name_or_path: str | os.PathLike) -> bool:
    """Whether ``from_pretrained`` reads this from disk rather than the hub: any existing path,
    except a folder named like a GPT-2 model that holds no model itself (the book's download
    leaves ``gpt2/124M/``, so ``gpt2`` in that folder's parent still means the name)."""
    path = Path(name_or_path)
    if not path.exists():
        return False
    if pretrained_repo(os.fspath(name_or_path)) is None or path.is_file():
        return True
    markers = (_HPARAMS, "config.json", "checkpoints", "checkpoint")
    return is_openai_checkpoint_dir(path) or any((path / m).exists() for m in markers)


def load_local(path: str | Path) -> tuple[GPTConfig, Params]:
    """Weights from a local path: OpenAI's directory (its own errors: CheckpointError naming the
    file and tensor), else anything :func:`jaxgpt.weights.load` reads."""
    if is_openai_checkpoint_dir(path):
        return load_openai_checkpoint(path)
    from jaxgpt import weights

    return weights.load(path)


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
) -> tuple[GPTConfig, Params]:
    """OpenAI's GPT-2 as ``(cfg, params)``: by name, or from a local directory or file.

    Names: ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (also ``124M`` ... ``1558M`` and
    ``openai-community/gpt2...``), fetched with ``huggingface_hub`` into its cache (``cache_dir``
    overrides it; ``HF_HUB_OFFLINE=1`` or ``local_files_only`` never touch the network). An
    existing local path wins over a name (see :func:`is_local_model`): the directory
    ``gpt_download.py`` writes, a Hugging Face directory, or anything else jaxgpt's loader reads.
    Needs no torch and no TensorFlow.
    """
    text = os.fspath(name_or_path)
    if is_local_model(text):
        return load_local(text)
    repo = pretrained_repo(text)
    if repo is None:
        names = ", ".join([*PRETRAINED, *[k for k in ALIASES if k.endswith("M")]])
        raise FileNotFoundError(f"{text!r} is neither an existing path nor a GPT-2 name ({names})")
    name = ALIASES.get(text, text)
    directory = _download(repo, name, cache_dir, local_files_only, revision)
    return load_hf_gpt2(directory)
