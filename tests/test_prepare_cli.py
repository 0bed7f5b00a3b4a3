"""scripts/prepare.py as a user meets it: every kind of bad input gives exit code 2 and one line
naming the flag or file, with nothing written; Ctrl-C gives 130; a run that failed, or an
unfinished one whose input changed since, does not block the next run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scripts_loader import load_script

from jaxgpt import shards as shards_mod
from jaxgpt.shards import open_shards
from jaxgpt.tokenizer import get_tokenizer

cli = load_script("prepare")
TEXT = "Every effort moves you forward.\nIt is the last line of the first part.\n" * 40


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def files(tmp_path) -> Path:
    """A directory holding a good text, an empty one, one that is not UTF-8 and a plain file."""
    (tmp_path / "good.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait.\n".encode("latin-1") * 10)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("no .txt here")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.me").write_text("someone's file")
    return tmp_path


BAD_INPUTS = [  # (arguments, what the one line must say); {d} is the directory of `files`
    (["{d}/missing.txt", "{d}/out"], "input {d}/missing.txt does not exist"),
    (["{d}/empty.txt", "{d}/out"], "empty input file(s): ['{d}/empty.txt']"),
    (["{d}/notes", "{d}/out"], "directory {d}/notes contains no .txt files"),
    (["{d}/latin1.txt", "{d}/out"], "{d}/latin1.txt is not valid UTF-8 (byte 3)"),  # found while working
    (["{d}/good.txt", "{d}/good.txt"], "output directory {d}/good.txt is a file"),
    (["{d}/good.txt", "{d}/good.txt/out"], "output directory {d}/good.txt/out cannot be created"),
    (["{d}/good.txt", "{d}/occupied"], "{d}/occupied is not empty and holds no prepared dataset"),
    (["{d}/good.txt", "{d}/out", "--workers", "0"], "argument --workers: must be a positive integer"),
    (["{d}/good.txt", "{d}/out", "--workers", "two"], "argument --workers: must be a positive integer"),
    (["{d}/good.txt", "{d}/out", "--chunk-mb", "0"], "argument --chunk-mb: must be a positive number"),
    (["{d}/good.txt", "{d}/out", "--chunk-mb", "nan"], "argument --chunk-mb: must be a positive number"),
    (["{d}/good.txt", "{d}/out", "--chunk-mb", "inf"], "argument --chunk-mb: must be a positive number"),
    (["{d}/good.txt", "{d}/out", "--shards", "3"], "unrecognized arguments: --shards 3"),
    (["{d}/good.txt"], "the following arguments are required: out_dir"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a[1:]) or a[0] for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_nothing_written(files, capsys, argv, message):
    before = _tree(files)
    argv = [a.replace("{d}", str(files)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as stopped:  # argparse's own errors
        code = stopped.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message.replace("{d}", str(files)) in err
    assert _tree(files) == before


def test_a_different_finished_dataset_is_refused_unless_overwritten(files, capsys):
    (files / "other.txt").write_text("Something else entirely.\n" * 30)
    assert cli.main([str(files / "good.txt"), str(files / "ds"), "--workers", "1"]) == 0
    manifest = (files / "ds" / "manifest.json").read_text()

    assert cli.main([str(files / "other.txt"), str(files / "ds"), "--workers", "1"]) == 2
    assert "already holds a different prepared dataset" in capsys.readouterr().err
    assert (files / "ds" / "manifest.json").read_text() == manifest

    assert cli.main([str(files / "other.txt"), str(files / "ds"), "--workers", "1", "--overwrite"]) == 0
    tokens = open_shards(files / "ds")
    np.testing.assert_array_equal(
        tokens[0 : len(tokens)], get_tokenizer().encode("Something else entirely.\n" * 30)
    )


def test_rerun_after_the_input_is_fixed_succeeds(files):
    # The first attempt fails on the Latin-1 file and leaves nothing; the fixed file then prepares.
    bad = files / "latin1.txt"
    assert cli.main([str(bad), str(files / "ds"), "--workers", "1"]) == 2
    assert not (files / "ds").exists()
    bad.write_text(bad.read_bytes().decode("latin-1"), encoding="utf-8")
    assert cli.main([str(bad), str(files / "ds"), "--workers", "1"]) == 0
    assert len(open_shards(files / "ds")) == len(get_tokenizer().encode(bad.read_text(encoding="utf-8")))


def test_ctrl_c_exits_130_and_an_unfinished_run_with_changed_input_starts_again(files, capsys, monkeypatch):
    real = shards_mod._tokenize_chunk
    calls: list[int] = []

    def interrupted(out_dir, index, chunk, tokenizer):
        if calls:
            raise KeyboardInterrupt  # Ctrl-C while the second shard is being made
        calls.append(index)
        return real(out_dir, index, chunk, tokenizer)

    monkeypatch.setattr(shards_mod, "_tokenize_chunk", interrupted)
    argv = [str(files / "good.txt"), str(files / "ds"), "--workers", "1", "--chunk-mb", "0.0005"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same command again to resume" in err
    assert (files / "ds" / "plan.json").is_file() and (files / "ds" / "shard_000000.json").is_file()
    monkeypatch.setattr(shards_mod, "_tokenize_chunk", real)

    # the input changed since: the leftover plan does not block the run, which starts again
    (files / "good.txt").write_text(TEXT + "One more line.\n")
    assert cli.main(argv) == 0
    tokens = open_shards(files / "ds")
    np.testing.assert_array_equal(tokens[0 : len(tokens)], get_tokenizer().encode(TEXT + "One more line.\n"))


def test_help_documents_the_exit_codes():
    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare.py"
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert run.returncode == 0
    assert "exit codes: 0 done, 2 bad input" in run.stdout and "130 interrupted" in run.stdout
