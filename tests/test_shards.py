"""Prepared token shards: the same windows as the in-memory loader, resumable preparation, and
clear errors for a wrong tokenizer, a missing manifest, a truncated or corrupt shard."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tiktoken

from jaxgpt import shards as shards_mod
from jaxgpt.data import DataLoader, default_corpus, sliding_windows
from jaxgpt.shards import (
    ShardError,
    ShardLoader,
    ShardWindows,
    open_shards,
    prepare_shards,
    shard_loaders,
)
from jaxgpt.tokenizer import EOT_ID, EOT_TEXT, get_tokenizer

CHUNK = 8192  # bytes of text per shard: many shards from a small text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 120 kB slice of the default corpus in one file, and its tokens the in-memory way."""
    tmp = tmp_path_factory.mktemp("corpus")
    text = default_corpus()[:120_000]
    path = tmp / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    ids = np.asarray(get_tokenizer().encode(text, allowed_special={EOT_TEXT}))
    return path, text, ids


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    path, _, _ = corpus
    out = tmp_path_factory.mktemp("prepared") / "ds"
    manifest = prepare_shards(path, out, num_workers=1, chunk_bytes=CHUNK, progress=False)
    return out, manifest


def test_shards_hold_exactly_the_tokens_of_the_whole_text(corpus, prepared):
    _, _, ids = corpus
    out, manifest = prepared
    assert len(manifest["shards"]) > 10  # really cut into pieces, each tokenized on its own
    tokens = open_shards(out)
    assert manifest["total_tokens"] == len(tokens) == len(ids)
    np.testing.assert_array_equal(tokens[0 : len(tokens)], ids)
    assert manifest["tokenizer"]["name"] == "gpt2" and manifest["separator"] is None


@pytest.mark.parametrize("max_length, stride", [(32, 32), (64, 17), (16, 40)])
def test_windows_equal_sliding_windows_across_shard_boundaries(corpus, prepared, max_length, stride):
    _, _, ids = corpus
    inputs, targets = sliding_windows(ids, max_length, stride)
    windows = ShardWindows(open_shards(prepared[0], verify=False), max_length, stride)
    assert len(windows) == len(inputs)
    x, y = windows.rows(np.arange(len(windows)))
    np.testing.assert_array_equal(x, inputs)
    np.testing.assert_array_equal(y, targets)


def test_loader_gives_the_in_memory_loaders_batches_and_resumes_mid_epoch(corpus, prepared):
    _, _, ids = corpus
    inputs, targets = sliding_windows(ids, 32, 24)
    memory = DataLoader(inputs, targets, batch_size=8, shuffle=True, seed=5)
    loader = ShardLoader(ShardWindows(open_shards(prepared[0], verify=False), 32, 24), 8, seed=5)
    assert len(loader) == len(memory)
    for epoch, start in [(0, 0), (3, 7)]:  # a resumed run asks for (epoch, next batch)
        for (xm, ym), (xs, ys) in zip(
            memory.iter_epoch(epoch, start), loader.iter_epoch(epoch, start), strict=True
        ):
            np.testing.assert_array_equal(xs, xm)
            np.testing.assert_array_equal(ys, ym)


def test_each_process_reads_its_rows_of_the_global_batch(prepared):
    windows = ShardWindows(open_shards(prepared[0], verify=False), 16, 16)
    whole = list(ShardLoader(windows, 8, seed=1).iter_epoch(2))
    parts = [
        list(ShardLoader(windows, 8, seed=1, process_index=p, process_count=4).iter_epoch(2))
        for p in range(4)
    ]
    for b, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([part[b][0] for part in parts]), x)
        np.testing.assert_array_equal(np.concatenate([part[b][1] for part in parts]), y)
    with pytest.raises(ValueError, match="divisible by process_count 3"):
        ShardLoader(windows, 8, process_count=3)


def test_train_val_split_by_tokens(prepared, corpus):
    _, _, ids = corpus
    train, val = shard_loaders(
        prepared[0], batch_size=4, max_length=32, stride=32, train_ratio=0.9, verify=False
    )
    split = int(0.9 * len(ids))
    x, _ = sliding_windows(ids[split:], 32, 32)
    xv = np.concatenate([b[0] for b in val.iter_epoch(0)])
    np.testing.assert_array_equal(xv, x[: len(xv)])
    assert train.windows.stop == split and not val.shuffle


def test_several_files_are_joined_by_end_of_text(tmp_path):
    (tmp_path / "in").mkdir()
    texts = ["The first document.\nIt ends here.", "A second one.", "And the third!\n"]
    for i, t in enumerate(texts):
        (tmp_path / "in" / f"doc{i}.txt").write_text(t)
    manifest = prepare_shards(tmp_path / "in", tmp_path / "ds", num_workers=1, progress=False)
    tok = get_tokenizer()
    expected = tok.encode(texts[0]) + [EOT_ID] + tok.encode(texts[1]) + [EOT_ID] + tok.encode(texts[2])
    tokens = open_shards(tmp_path / "ds")
    np.testing.assert_array_equal(tokens[0 : len(tokens)], expected)
    assert manifest["separator"] == EOT_ID


def test_parallel_workers_make_the_same_shards(corpus, prepared, tmp_path):
    manifest = prepare_shards(corpus[0], tmp_path / "ds", num_workers=2, chunk_bytes=CHUNK, progress=False)
    assert manifest["shards"] == prepared[1]["shards"]


def test_interrupted_preparation_resumes_and_keeps_finished_shards(corpus, prepared, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    real = shards_mod._tokenize_chunk
    calls = []

    def interrupted(out_dir, index, chunk, tokenizer):
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the fourth shard is being made
        calls.append(index)
        return real(out_dir, index, chunk, tokenizer)

    monkeypatch.setattr(shards_mod, "_tokenize_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(corpus[0], out, num_workers=1, chunk_bytes=CHUNK, progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardError, match="incomplete prepared dataset .* run scripts/prepare.py again"):
        open_shards(out)
    done = {i: (out / f"shard_{i:06d}.bin").stat().st_mtime_ns for i in calls}

    # a half-written shard (no marker) is made again; finished ones are not touched
    (out / "shard_000003.bin").write_bytes(b"\x00\x01\x02")
    calls.clear()
    monkeypatch.setattr(shards_mod, "_tokenize_chunk", lambda *a: (calls.append(a[1]), real(*a))[1])
    manifest = prepare_shards(corpus[0], out, num_workers=1, chunk_bytes=CHUNK, progress=False)
    assert sorted(calls) == list(range(3, len(manifest["shards"])))
    assert {i: (out / f"shard_{i:06d}.bin").stat().st_mtime_ns for i in done} == done
    assert manifest["shards"] == prepared[1]["shards"]
    np.testing.assert_array_equal(open_shards(out)[0 : manifest["total_tokens"]], corpus[2])


def test_refuses_to_mix_a_different_dataset_into_a_directory(corpus, prepared, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Something else entirely.\n" * 50)
    with pytest.raises(FileExistsError, match="already holds a different prepared dataset"):
        prepare_shards(other, prepared[0], num_workers=1, chunk_bytes=CHUNK, progress=False)
    assert open_shards(prepared[0]).manifest == prepared[1]  # untouched
    (tmp_path / "notempty").mkdir()
    (tmp_path / "notempty" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_shards(other, tmp_path / "notempty", num_workers=1, progress=False)


def _copy(prepared, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(prepared[0], dst)
    return dst


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match=r"no manifest.json .*\(make one with scripts/prepare.py\)"):
        open_shards(tmp_path)


def test_truncated_shard_is_an_error_before_training(prepared, tmp_path):
    ds = _copy(prepared, tmp_path)
    path = ds / "shard_000002.bin"
    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(ShardError, match="shard_000002.bin is truncated or corrupt"):
        open_shards(ds, verify=False)


def test_corrupt_shard_fails_its_checksum(prepared, tmp_path):
    ds = _copy(prepared, tmp_path)
    path = ds / "shard_000001.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    open_shards(ds, verify=False)  # sizes alone cannot see it
    with pytest.raises(ShardError, match="shard_000001.bin is corrupt: sha256"):
        open_shards(ds)


def test_missing_shard_is_an_error(prepared, tmp_path):
    ds = _copy(prepared, tmp_path)
    (ds / "shard_000004.bin").unlink()
    with pytest.raises(ShardError, match="shard_000004.bin listed in the manifest is missing"):
        open_shards(ds)


def test_dataset_made_with_another_tokenizer_is_refused(tmp_path):
    byte_level = tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT_TEXT: 256},
    )
    (tmp_path / "a.txt").write_text("Every effort moves you forward.\n" * 20)
    prepare_shards(tmp_path / "a.txt", tmp_path / "ds", num_workers=1, tokenizer=byte_level, progress=False)
    assert len(open_shards(tmp_path / "ds", tokenizer=byte_level)) == 32 * 20
    with pytest.raises(ShardError, match="tokenized with 'bytes' .* but training uses 'gpt2'"):
        open_shards(tmp_path / "ds")


def test_manifest_records_checksums_and_tokenizer_files(prepared):
    out, manifest = prepared
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert set(manifest["tokenizer"]["bpe_files"]) == {"vocab.bpe", "encoder.json"}
    import hashlib

    first = manifest["shards"][0]
    assert hashlib.sha256((out / first["file"]).read_bytes()).hexdigest() == first["sha256"]
    assert (out / first["file"]).stat().st_size == 2 * first["tokens"]  # uint16


def test_memory_mapped_reading_gives_the_same_tokens(prepared):
    by_pread = open_shards(prepared[0], verify=False)
    by_mmap = open_shards(prepared[0], verify=False, use_mmap=True)
    for a, b in [(0, 50), (5000, 9000), (len(by_pread) - 30, len(by_pread))]:
        np.testing.assert_array_equal(by_mmap[a:b], by_pread[a:b])


def test_pre_tokenized_arrays_become_a_dataset(tmp_path):
    from jaxgpt.shards import write_token_shards

    parts = [np.arange(0, 100), np.arange(100, 130), np.arange(130, 400)]
    manifest = write_token_shards(parts, tmp_path / "ds")
    tokens = open_shards(tmp_path / "ds")
    np.testing.assert_array_equal(tokens[0:400], np.arange(400))
    np.testing.assert_array_equal(tokens[95:135], np.arange(95, 135))  # across two shard ends
    assert manifest["total_tokens"] == 400
    with pytest.raises(ValueError, match=r"token ids must be 1-D and in \[0, 50257\)"):
        write_token_shards([np.array([50257])], tmp_path / "bad")
