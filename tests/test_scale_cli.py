"""scripts/train.py with the scale-out options: a prepared shard directory as --data, --mesh errors."""

import json
from pathlib import Path

import pytest
from scripts_loader import load_script

from jaxgpt.data import default_corpus
from jaxgpt.shards import prepare_shards

cli = load_script("train")
# A tiny model (16 wide, 1 layer) for 4 steps, saving every 2
TINY = (
    "--context-length 16 --set emb_dim=16 --set n_heads=2 --set n_layers=1 --batch-size 4 "
    "--eval-freq 3 --eval-iter 2 --max-steps 4 --save-every 2 --sample-tokens 0"
).split()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("shards")
    (tmp / "corpus.txt").write_text(default_corpus()[:25_000], encoding="utf-8")
    prepare_shards(tmp / "corpus.txt", tmp / "ds", num_workers=1, chunk_bytes=4096, progress=False)
    return tmp / "ds"


def test_train_streams_a_prepared_directory_and_resumes_from_it(shard_dir, tmp_path):
    out = tmp_path / "run"
    assert cli.main([*TINY, "--data", str(shard_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert config["data"]["fingerprint"] == manifest["dataset_id"]
    split = int(0.9 * manifest["total_tokens"])  # split by tokens, not characters
    assert (config["data"]["train_tokens"], config["data"]["val_tokens"]) == (
        split,
        manifest["total_tokens"] - split,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 4] and all(r["val_loss"] < 11.5 for r in records)
    # --resume re-opens the same shards (and checks them) and finishes the run from step 2
    last = sorted((out / "checkpoints").iterdir(), key=lambda p: int(p.name))[-1]
    assert last.name == "4"
    import shutil

    shutil.rmtree(last)
    assert cli.main(["--resume", str(out)]) == 0
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert again[-1]["train_loss"] == records[-1]["train_loss"]  # bit-identical continuation


def test_corrupt_prepared_directory_stops_before_training(shard_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    shard = bad / "shard_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert cli.main([*TINY, "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "shard_000001.bin is truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_incomplete_prepared_directory_is_named_as_such(shard_dir, tmp_path, capsys):
    # prepare.py stopped before writing its manifest: not "no .txt files", but what it is
    import shutil

    half = tmp_path / "half"
    shutil.copytree(shard_dir, half)
    (half / "manifest.json").unlink()
    assert cli.main([*TINY, "--data", str(half), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{half} is an incomplete prepared dataset" in err and "run scripts/prepare.py again" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mesh_that_does_not_fit_the_devices_is_a_usage_error(tmp_path, capsys):
    assert cli.main([*TINY, "--mesh", "data=2,fsdp=4", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--mesh: mesh data=2,fsdp=4,tensor=1 has 8 devices but JAX sees 1" in err
