"""scripts/train.py: output files, Ctrl-C then --resume, and a clear error for each bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scripts_loader import load_script

from jaxgpt.checkpoint import load_checkpoint
from jaxgpt.data import default_corpus

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train.py"


cli = load_script("train")

# A tiny model (GPT-2's vocabulary, 16 wide, 1 layer) on ~6k tokens: a few seconds of training.
TINY = ["--context-length", "16", "--set", "emb_dim=16", "--set", "n_heads=2", "--set", "n_layers=1",
        "--batch-size", "4", "--eval-freq", "3", "--eval-iter", "2", "--max-steps", "8", "--save-every", "4",
        "--sample-tokens", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(default_corpus()[:25_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, text_file):
    """An uninterrupted 8-step CLI run (in this process, so compiled functions are shared)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    rc = cli.main([*TINY, "--data", str(text_file), "--out", str(out)])
    assert rc == 0
    return out


def same_params(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_run_writes_config_metrics_plot_and_checkpoints(full_run, text_file):
    config = json.loads((full_run / "config.json").read_text())
    assert config["model_config"]["emb_dim"] == 16 and config["model_config"]["context_length"] == 16
    assert config["train_config"]["batch_size"] == 4 and config["total_steps"] == 8
    assert config["data"]["paths"] == [str(text_file.resolve())]

    records = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 4, 7, 8]  # after step 1, every 3 steps, and the last
    for r in records:
        assert r["tokens_seen"] == r["step"] * 4 * 16
        assert 0 < r["val_loss"] < 11.5 and 0 < r["train_loss"] < 11.5  # ln(50257) = 10.8 at the start

    png = (full_run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000

    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["4", "8"]
    cfg, params = load_checkpoint(full_run)
    assert (cfg.emb_dim, cfg.n_layers, cfg.context_length) == (16, 1, 16)
    assert params["tok_emb"]["embedding"].shape == (50257, 16)


def test_ctrl_c_saves_a_checkpoint_and_resume_ends_identical(full_run, text_file, tmp_path):
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAXGPT_NO_RELAUNCH": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--data", str(text_file), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:  # the first line comes just before the first step
        lines.append(line)
        if line.startswith("Training:"):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert f"Resume with: python scripts/train.py --resume {out}" in output
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and 1 <= saved[0] < 8, saved

    assert cli.main(["--resume", str(out)]) == 0
    assert same_params(load_checkpoint(out)[1], load_checkpoint(full_run)[1])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 4, 7, 8][-len(steps) :] and steps[-1] == 8


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: (d / "empty.txt").write_text("  \n") and d / "empty.txt", "is empty"),
        (
            lambda d: (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50) and d / "latin1.txt",
            "is not UTF-8",
        ),
        (lambda d: (d / "sub").mkdir() or d / "sub", "holds no .txt files"),
        (
            lambda d: (d / "small.txt").write_text("Every effort moves you " * 8) and d / "small.txt",
            "corpus too small",
        ),
    ],
    ids=["missing", "empty", "not-utf8", "no-txt-in-dir", "too-small"],
)
def test_bad_data_is_named_before_training(capsys, tmp_path, make, message):
    err = _error(capsys, [*TINY, "--data", str(make(tmp_path)), "--out", str(tmp_path / "out")])
    assert message in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_unreadable_data_file(capsys, tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("text")
    original = Path.read_bytes

    def deny(self):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", deny)  # root can read any file, so deny it here
    assert "cannot be read: Permission denied" in _error(capsys, [*TINY, "--data", str(path)])


def test_shapes_that_cannot_fit(capsys, text_file, tmp_path):
    err = _error(capsys, ["--context-length", "4096", "--data", str(text_file), "--out", str(tmp_path)])
    assert "--context-length 4096 does not fit preset 'quickstart'" in err
    err = _error(capsys, [*TINY, "--batch-size", "5000", "--data", str(text_file), "--out", str(tmp_path)])
    assert "batch too large" in err


def test_unwritable_output_dir(capsys, text_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = _error(capsys, [*TINY, "--data", str(text_file), "--out", str(blocker / "run")])
    assert f"output directory {blocker / 'run'} cannot be written" in err


def test_resume_needs_a_readable_checkpoint(capsys, full_run, tmp_path):
    assert "is not a run directory" in _error(capsys, ["--resume", str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((full_run / "config.json").read_text())
    assert "no checkpoint in" in _error(capsys, ["--resume", str(empty)])

    broken = tmp_path / "broken"
    shutil.copytree(full_run, broken)
    for f in (broken / "checkpoints" / "8" / "state").rglob("*"):  # damage the latest step's optimizer state
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage")
    err = _error(capsys, ["--resume", str(broken)])
    assert "checkpoint step 8" in err and "could not be read" in err and "steps [4]" in err
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["4", "8"]  # nothing removed
    assert "drop --lr" in _error(capsys, ["--resume", str(full_run), "--lr", "1"])


def test_help_documents_every_flag():
    text = cli.build_parser().format_help()
    flags = """--preset --data --context-length --batch-size --stride --epochs --max-steps --lr --min-lr
        --weight-decay --warmup-steps --grad-clip --grad-accum --dtype --eval-freq --eval-iter --sample-tokens
        --save-every --keep --seed --out --resume --set""".split()
    for flag in flags:
        assert flag in text


def test_precision_defaults_follow_the_backend(full_run, text_file, tmp_path, monkeypatch):
    def model_config(out, *extra):
        argv = [*TINY, "--set", "n_layers=2", "--max-steps", "1", "--eval-freq", "5", *extra]
        assert cli.main([*argv, "--data", str(text_file), "--out", str(out)]) == 0
        return json.loads((out / "config.json").read_text())["model_config"]

    on_cpu = json.loads((full_run / "config.json").read_text())["model_config"]
    assert (on_cpu["dtype"], on_cpu["activation_dtype"], on_cpu["scan_unroll"]) == ("float32", "float32", 1)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what the CLI would see on a GPU
    gpu = model_config(tmp_path / "gpu")
    assert (gpu["dtype"], gpu["activation_dtype"], gpu["scan_unroll"]) == ("bfloat16", "bfloat16", 2)
    asked = model_config(tmp_path / "f32", "--dtype", "float32")  # the user's choice wins
    assert (asked["dtype"], asked["activation_dtype"]) == ("float32", "float32")
