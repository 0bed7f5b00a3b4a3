"""scripts/finetune_instruct.py: bad input stops with exit 2 before any work; a tiny run end to end.

The data is the first entries of the book's chapter 7 instruction-data.json (rasbt/LLMs-from-scratch,
Apache-2.0), read from ../shared/data with --limit; where that copy is absent a few made-up entries
stand in.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_helpers import SHARED_DATA, help_text, run_main, save_tiny_model
from scripts_loader import load_script

from jaxgpt.checkpoint import load_checkpoint
from jaxgpt.config import GPTConfig

cli = load_script("finetune_instruct")
DATA = SHARED_DATA / "instruction-data.json"
TINY = GPTConfig(context_length=96, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)  # GPT-2's 50257 ids
# 30 entries: 25 train (6 steps of 4 per epoch), 3 test, 2 validation
FAST = ["--limit", 30, "--batch-size", 4, "--eval-freq", 4, "--eval-iter", 1, "--sample-tokens", 3,
        "--max-new-tokens", 6]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    if DATA.is_file():
        return DATA
    path = tmp_path_factory.mktemp("data") / "instruction-data.json"
    entries = [
        {
            "instruction": f"Add {i} and {i + 1}.",
            "input": "" if i % 2 else f"{i}, {i + 1}",
            "output": str(2 * i + 1),
        }
        for i in range(40)
    ]
    path.write_text(json.dumps(entries))
    return path


def _run(capsys, *argv):
    return run_main(capsys, cli.main, *argv)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_names_the_defaults_and_exit_codes(capsys):
    out = help_text(capsys, cli.main)
    assert "Exit codes: 0 done; 2 bad input" in out and "130" in out
    assert "instruction-data.json" in out and "Apache-2.0" in out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "the file is empty"),
        (
            [{"instruction": "a", "output": "b"}, {"input": "x", "output": "c"}],
            "entry 1 has no 'instruction' field",
        ),
        ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], "entry 1 has no 'output' field"),
        ([{"instruction": "a", "output": 7}], "entry 0, field 'output' must be a string, got int"),
    ],
)
def test_bad_data_stops_before_any_work(capsys, tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code, _, err = _run(capsys, "--data", path, "--from-scratch", "--out", tmp_path / "run")
    assert code == 2 and expected in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_options_and_directories_stop_with_one_line(capsys, tmp_path, data, tiny_model):
    out = tmp_path / "run"
    cases = [
        (["--lr", 0, "--from-scratch"], "--lr must be a positive number"),
        (["--epochs", 0, "--from-scratch"], "--epochs must be a positive integer"),
        ([], "give the starting weights"),
        (["--init-from", tmp_path / "nothing"], "--init-from"),
        (["--init-from", tiny_model, "--allowed-max-length", 200], "longer than the model's context of 96"),
        (["--resume"], "holds no run"),
        (["--init-from", tiny_model, "--limit", 5], "each part needs an entry"),
    ]
    for argv, expected in cases:
        code, _, err = _run(capsys, "--data", data, "--out", out, *argv)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "--data", data, "--out", out, "--init-from", tiny_model)
    assert code == 2 and "is not empty" in err and (out / "notes.txt").read_text() == "mine"


def test_a_malformed_option_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "run"), "--epochs", "two"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--epochs" in err and len(err.strip().splitlines()) == 1


def test_a_judge_that_does_not_answer_stops_before_any_work(capsys, tmp_path, data, tiny_model):
    dead = f"http://127.0.0.1:{_free_port()}"
    out = tmp_path / "run"
    code, _, err = _run(capsys, "--data", data, "--out", out, "--init-from", tiny_model, "--judge", dead)
    assert code == 2 and f"--judge: the judge at {dead}/api/chat does not answer" in err
    assert not out.exists()


class _Judge(http.server.BaseHTTPRequestHandler):
    """Ollama's chat API; answers 500 to scoring requests while ``failing`` is set."""

    failing = False
    scored = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        if type(self).failing and prompt.startswith("Given the input"):
            self.send_response(500)
            self.end_headers()
            return
        type(self).scored += prompt.startswith("Given the input")
        self.send_response(200)
        self.end_headers()
        self.wfile.write((json.dumps({"message": {"content": "42"}, "done": True}) + "\n").encode())

    def log_message(self, *args):
        pass


def test_end_to_end_resumes_bit_for_bit_and_keeps_answers_when_the_judge_fails(
    capsys, tmp_path, data, tiny_model
):
    whole, split = tmp_path / "whole", tmp_path / "split"
    code, out, err = _run(
        capsys, "--data", data, "--init-from", tiny_model, "--out", whole, "--epochs", 2, *FAST
    )
    assert code == 0, err
    assert "Ep 1 (Step 000000): Train loss" in out and "Ep 2 (Step 000008): Train loss" in out
    for name in ("metrics.jsonl", "loss.png", "results.json", cli.RESPONSES):
        assert (whole / name).is_file(), name
    answers = json.loads((whole / cli.RESPONSES).read_text())
    test_entries = json.loads(Path(data).read_text())[:30][25:28]  # the book's 85% / 10% slices
    assert [{k: v for k, v in a.items() if k != "model_response"} for a in answers] == test_entries
    assert all(isinstance(a["model_response"], str) for a in answers)
    results = json.loads((whole / "results.json").read_text())
    assert (
        results["step"] == 12
        and np.isfinite(results["val_loss"])
        and np.isfinite(results["test_response_loss"])
    )

    # one epoch, then --resume to two: the same steps, losses and weights as one run of two
    assert (
        _run(capsys, "--data", data, "--init-from", tiny_model, "--out", split, "--epochs", 1, *FAST)[0] == 0
    )
    code, out, err = _run(capsys, "--out", split, "--resume", "--epochs", 2, *FAST)
    assert code == 0, err
    assert "resuming" in err and "Ep 2 (Step 000008)" in out
    by_step = {r["step"]: r for r in map(json.loads, (split / "metrics.jsonl").read_text().splitlines())}
    for record in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines()):
        again = by_step[record["step"]]
        assert (again["train_loss"], again["val_loss"]) == (record["train_loss"], record["val_loss"])
    _, a = load_checkpoint(whole)
    _, b = load_checkpoint(split)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert json.loads((split / cli.RESPONSES).read_text()) == answers

    # a judge that fails mid-way: exit 1, every answer still on disk; later the same answers are scored
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _Judge.failing = True
        code, _, err = _run(capsys, "--out", whole, "--resume", "--epochs", 2, "--judge", url, *FAST)
        assert code == 1 and f"{url}/api/chat answered HTTP 500" in err and "answers are kept" in err
        assert json.loads((whole / cli.RESPONSES).read_text()) == answers
        _Judge.failing = False
        code, out, err = _run(capsys, "--out", whole, "--resume", "--epochs", 2, "--judge", url, *FAST)
        assert code == 0, err
        assert "read from" in out and "Number of scores: 3 of 3" in out and "Average score: 42.00" in out
        assert json.loads((whole / "results.json").read_text())["judge"]["scores"] == [42, 42, 42]
    finally:
        server.shutdown()
        server.server_close()
    shutil.rmtree(split)


def test_ctrl_c_before_the_first_checkpoint_leaves_nothing(capsys, tmp_path, data, tiny_model, monkeypatch):
    out = tmp_path / "run"

    def interrupted(args, prep):
        (args.out / "metrics.jsonl").write_text("")  # what a run writes before its first checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    code, _, err = _run(capsys, "--data", data, "--init-from", tiny_model, "--out", out, *FAST)
    assert code == 130 and "interrupted" in err and not out.exists()
