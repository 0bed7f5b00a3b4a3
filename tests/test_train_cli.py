"""scripts/train.py: output files, Ctrl-C then --resume, and a clear error for each bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
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


def run_main(argv) -> int:
    """cli.main's exit code, also when argparse exits (a bad option) or main raises SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and directory under ``roots``: kind, size, modification time and content."""
    return {
        str(p): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for root in roots
        for p in [root, *root.rglob("*")]
        if p.exists()
    }


def _file(name: str, content: bytes | str):
    def make(d: Path) -> Path:
        path = d / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return path

    return make


def _run_dir(config: str | None, with_checkpoints: bool = False):
    """A directory like a run's: a config.json holding ``config`` (None: the full run's)."""

    def make(d: Path, full: Path) -> Path:
        run = d / "run"
        if with_checkpoints:
            shutil.copytree(full, run)
        else:
            run.mkdir()
        (run / "config.json").write_text((full / "config.json").read_text() if config is None else config)
        return run

    return make


def _damaged(d: Path, full: Path) -> Path:
    """A run stopped at step 4 whose checkpoint's optimizer state was damaged."""
    broken = d / "broken"
    shutil.copytree(full, broken)
    shutil.rmtree(broken / "checkpoints" / "8")
    for f in (broken / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage")
    return broken


def _stray(d: Path) -> Path:
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("mine")
    return d / "notes"


def _killed_before_first_save(d: Path, full: Path) -> Path:
    run = _run_dir(None)(d, full)
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints").mkdir()
    return run


# (id, extra options after TINY --data TEXT --out OUT, or a builder of the whole argv; expected
# exit code, text the one-line message holds). Every case leaves every file as it was.
BAD_OPTIONS = [
    ("lr-inf", ["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    ("lr-nan", ["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    ("lr-zero", ["--lr", "0"], "--lr must be a positive finite number"),
    ("lr-text", ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    ("min-lr-above-lr", ["--lr", "1e-3", "--min-lr", "1"], "--min-lr must not exceed the learning rate"),
    ("grad-clip-inf", ["--grad-clip", "inf"], "--grad-clip must be a positive finite number or None"),
    ("weight-decay-nan", ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    ("batch-size-zero", ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ("batch-size-text", ["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    ("epochs-negative", ["--epochs", "-1"], "--epochs must be a positive integer, got -1"),
    ("max-steps-zero", ["--max-steps", "0"], "--max-steps must be a positive integer or None, got 0"),
    ("grad-accum-zero", ["--grad-accum", "0"], "--grad-accum must be a positive integer"),
    ("eval-freq-zero", ["--eval-freq", "0"], "--eval-freq must be a positive integer"),
    ("seed-negative", ["--seed", "-1"], "--seed must be an integer >= 0"),
    ("sample-temperature-negative", ["--sample-temperature", "-1"], "--sample-temperature must be"),
    ("sample-top-k-zero", ["--sample-top-k", "0"], "--sample-top-k must be a positive integer"),
    ("save-every-negative", ["--save-every", "-1"], "--save-every must be an integer >= 0"),
    ("keep-zero", ["--keep", "0"], "--keep must be a positive integer"),
    ("set-not-divisible", ["--set", "n_heads=3"], "--set: GPTConfig.emb_dim (16) must be divisible"),
    ("set-drop-rate-nan", ["--set", "drop_rate=NaN"], "--set: GPTConfig.drop_rate must be in [0, 1)"),
    ("set-unknown-field", ["--set", "width=3"], "--set names an unknown GPTConfig field"),
    ("set-no-value", ["--set", "n_layers"], "--set expects FIELD=VALUE"),
    ("context-too-long", ["--context-length", "4096"], "--context-length 4096 does not fit preset"),
    ("unknown-preset", ["--preset", "gpt5"], "argument --preset: invalid choice: 'gpt5'"),
    ("unknown-flag", ["--learning-rate", "1"], "unrecognized arguments: --learning-rate"),
    ("bad-mesh", ["--mesh", "pipeline=2"], "--mesh"),
    ("batch-too-large", ["--batch-size", "5000"], "batch too large"),
]
BAD_DATA = [  # (id, make the --data path in a directory, message)
    ("missing", lambda d: d / "missing.txt", "does not exist"),
    ("zero-bytes", _file("zero.txt", b""), "empty input file"),
    ("blank", _file("blank.txt", "  \n"), "is empty"),
    ("not-utf8", _file("latin1.txt", "caf\xe9 ".encode("latin-1") * 50), "is not UTF-8"),
    ("no-txt-in-dir", lambda d: (d / "sub").mkdir() or d / "sub", "contains no .txt files"),
    ("too-small", _file("small.txt", "Every effort moves you " * 8), "corpus too small"),
]
BAD_OUT = [  # (id, make the --out path from (directory, full run), message)
    ("a-file", lambda d, full: _file("file", "x")(d), "exists and is not a directory"),
    ("under-a-file", lambda d, full: _file("file", "x")(d) / "run", "cannot be written"),
    ("not-empty", lambda d, full: _stray(d).parent, "is not empty (it holds notes)"),
    (
        "killed-before-first-save",
        _killed_before_first_save,
        "is not empty (it holds checkpoints, config.json",
    ),
    ("holding-a-config", _run_dir('{"keep": 2}'), "is not empty (it holds config.json)"),
    ("a-finished-run", lambda d, full: full, "already holds a run's checkpoints; continue it with --resume"),
]
BAD_RESUME = [  # (id, make the --resume argv from (directory, full run), message)
    ("missing", lambda d, full: [d / "nowhere"], "does not exist"),
    ("no-config", lambda d, full: [d], "is not a run directory (it has no config.json)"),
    ("invalid-json", _run_dir("{not json"), "config.json is not valid JSON"),
    ("a-list", _run_dir("[1, 2]"), "config.json is not a train.py run config: it holds a list"),
    ("missing-keys", _run_dir('{"keep": 2}'), "is not a train.py run config: 'total_steps' is missing"),
    ("wrong-types", _run_dir('{"total_steps": "8", "save_every": 4, "keep": 2, "num_params": 1, "data": []}'),
     "'total_steps' is missing or not an integer; 'data' is missing or not an object"),
    ("no-checkpoints", _run_dir(None), "no checkpoint in"),
    ("damaged-checkpoint", _damaged, "checkpoint step 4 in"),
    ("with-options", lambda d, full: [full, "--lr", "1", "--save-every", "3"], "drop --lr, --save-every"),
]  # fmt: skip


def _cases():
    for name, extra, message in BAD_OPTIONS:
        argv = lambda d, full, text, extra=extra: [*TINY, "--data", text, "--out", d / "out", *extra]  # noqa: E731
        yield pytest.param(argv, message, id=f"option-{name}")
    for name, make, message in BAD_DATA:
        yield pytest.param(lambda d, full, text, make=make: [*TINY, "--data", make(d), "--out", d / "out"],
                           message, id=f"data-{name}")  # fmt: skip
    for name, make, message in BAD_OUT:
        yield pytest.param(lambda d, full, text, make=make: [*TINY, "--data", text, "--out", make(d, full)],
                           message, id=f"out-{name}")  # fmt: skip
    for name, make, message in BAD_RESUME:

        def argv(d, full, text, make=make):
            made = make(d, full)
            return ["--resume", *(made if isinstance(made, list) else [made])]

        yield pytest.param(argv, message, id=f"resume-{name}")


@pytest.mark.parametrize("make_argv, message", list(_cases()))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(capsys, tmp_path, full_run, text_file,
                                                             make_argv, message):  # fmt: skip
    argv = [str(a) for a in make_argv(tmp_path, full_run, text_file)]
    before = snapshot(tmp_path, full_run, text_file.parent)
    capsys.readouterr()
    rc = run_main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (argv, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and out == "", (out, err)
    assert message in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path, full_run, text_file.parent) == before, "a file was changed or left behind"


def test_unreadable_data_file(capsys, tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("text")
    original = Path.read_bytes

    def deny(self):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", deny)  # root can read any file, so deny it here
    assert run_main([*TINY, "--data", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "cannot be read: Permission denied" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resuming_a_finished_run_changes_nothing(capsys, full_run):
    before = snapshot(full_run)
    assert run_main(["--resume", str(full_run)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{full_run} is already complete: nothing to do (its files are unchanged)\n", out
    assert snapshot(full_run) == before


def _interrupt(text_file: Path, out: Path, moment: str | float) -> subprocess.Popen:
    """Start train.py and send it SIGINT after ``moment`` seconds, or when a line starts with it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the allocator re-execution stays on: Ctrl-C survives it
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--data", str(text_file), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip

    def watch():
        if isinstance(moment, float):
            time.sleep(moment)
            proc.send_signal(signal.SIGINT)
        for line in proc.stdout:
            proc.lines.append(line)
            if isinstance(moment, str) and line.startswith(moment) and not proc.sent:
                proc.sent = True
                proc.send_signal(signal.SIGINT)

    proc.lines, proc.sent = [], False
    proc.watcher = threading.Thread(target=watch, daemon=True)
    proc.watcher.start()
    return proc


# From start-up (importing JAX) to the end (the last step done, its sample printed).
MOMENTS = {
    "start-up": 1.5,
    "first-step": "Training:",
    "mid-run": "saved checkpoint",
    "last-step": "Ep 1 sample",
}


def test_ctrl_c_at_any_moment_exits_130_and_resumes_to_the_same_run(full_run, text_file, tmp_path):
    procs = {name: _interrupt(text_file, tmp_path / name, moment) for name, moment in MOMENTS.items()}

    def losses(run: Path) -> dict[str, float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {f"{r['step']} {split}": r[f"{split}_loss"] for r in records for split in ("train", "val")}

    full_losses = losses(full_run)
    for name, proc in procs.items():
        err = proc.stderr.read()
        proc.wait(timeout=300)
        proc.watcher.join(timeout=60)
        output = "".join(proc.lines) + err
        assert proc.returncode == 130, (name, output)
        assert "Traceback" not in err and "Exception ignored" not in err, (name, err)
        messages = [m for m in re.split(r"[\r\n]+", err) if m.strip() and not m.startswith("train:")]
        assert len(messages) == 1 and messages[0].startswith("interrupted"), (name, messages)

        out = tmp_path / name
        if not (out / "checkpoints").is_dir():  # stopped before training began: nothing left
            assert name == "start-up" and not out.exists(), f"{name}: {sorted(out.rglob('*'))}"
            assert messages[0].startswith("interrupted before") and "nothing was" in messages[0], messages
            continue
        saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
        assert saved and 1 <= saved[-1] <= 8, (name, saved)
        resume = f"continue with: python scripts/train.py --resume {out}"
        then = "the run is complete" if saved[-1] == 8 else resume
        assert messages[0].endswith(then), (name, messages)
        assert run_main(["--resume", str(out)]) == 0, name
        assert same_params(load_checkpoint(out)[1], load_checkpoint(full_run)[1]), name
        assert losses(out) == pytest.approx(full_losses, rel=1e-6), name


def test_help_documents_every_flag():
    text = cli.build_parser().format_help()
    flags = """--preset --data --context-length --batch-size --stride --epochs --max-steps --lr --min-lr
        --weight-decay --warmup-steps --grad-clip --grad-accum --dtype --eval-freq --eval-iter --sample-tokens
        --sample-temperature --sample-top-k --save-every --keep --seed --out --resume --set --mesh""".split()
    for flag in flags:
        assert flag in text
    assert "Exit codes: 0 finished" in " ".join(text.split())
    for code in ("1 a failure during training", "2 bad input", "130 interrupted by Ctrl-C"):
        assert code in " ".join(text.split()), code


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
