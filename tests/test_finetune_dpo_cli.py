"""scripts/finetune_dpo.py: bad input stops with exit 2 before any work; a tiny run end to end,
interrupted and resumed bit for bit.

The data is the first entries of the book's instruction-data-with-preference.json
(rasbt/LLMs-from-scratch, Apache-2.0), copied from ../shared/data; tests that need it skip
where it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_helpers import SHARED_DATA, help_text, run_main, save_tiny_model
from scripts_loader import load_script

import jaxgpt
from jaxgpt.config import GPTConfig

cli = load_script("finetune_dpo")
DATA = SHARED_DATA / "instruction-data-with-preference.json"
needs_data = pytest.mark.skipif(not DATA.is_file(), reason="the preference file copy is not here")
TINY = GPTConfig(context_length=96, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)  # GPT-2's 50257 ids


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """The first 12 entries: 10 / 1 / 1 after the book's split (train, test, validation)."""
    path = tmp_path_factory.mktemp("data") / "prefs.json"
    path.write_text(json.dumps(json.loads(DATA.read_text())[:12]))
    return path


def _run(capsys, *argv):
    try:
        return run_main(capsys, cli.main, *argv)
    except SystemExit as e:  # argparse's own errors: one line and exit 2 too
        out = capsys.readouterr()
        return e.code, out.out, out.err


def test_help_lists_every_option_and_the_exit_codes(capsys):
    out = help_text(capsys, cli.main)
    assert "Exit codes: 0 done; 2 bad input" in out and "130 interrupted" in out
    for flag in (
        "--data --init-from --from-scratch --beta --lr --weight-decay --epochs --batch-size --eval-freq "
        "--eval-iter --allowed-max-length --prompt-style --out --resume --seed --limit"
    ).split():
        assert flag in out, flag


def _bad_entries(tmp_path: Path, change) -> Path:
    entries = json.loads(DATA.read_text())[:24]
    change(entries)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(entries))
    return path


@needs_data
@pytest.mark.parametrize(
    ("make_argv", "expected"),
    [
        (lambda t, m, d: ["--data", _bad_entries(t, lambda es: es[3].pop("chosen")), "--init-from", m],
         "entry 3 has no 'chosen'"),
        (lambda t, m, d: ["--data", _bad_entries(t, lambda es: es[5].update(rejected=7)), "--init-from", m],
         "entry 5 field 'rejected' is a int, not a string"),
        (lambda t, m, d: ["--data", _bad_entries(t, list.clear), "--init-from", m], "holds no entries"),
        (lambda t, m, d: ["--data", d], "give the starting weights"),
        (lambda t, m, d: ["--data", d, "--init-from", t / "nothing"], "--init-from"),
        (lambda t, m, d: ["--data", d, "--init-from", m, "--batch-size", 0], "--batch-size"),
        (lambda t, m, d: ["--data", d, "--init-from", m, "--beta", -1], "--beta"),
        (lambda t, m, d: ["--data", d, "--init-from", m, "--limit", 4], "fewer than --batch-size 8"),
        (lambda t, m, d: ["--data", d, "--init-from", m, "--allowed-max-length", 20], "entry 0: its prompt"),
        (lambda t, m, d: ["--resume"], "holds no run to resume"),
        (lambda t, m, d: ["--resume", "--lr", 1e-3], "drop --lr"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    capsys, tmp_path, tiny_model, prefs, make_argv, expected
):
    out = tmp_path / "run"
    code, _, err = _run(capsys, *make_argv(tmp_path, tiny_model, prefs), "--out", out)
    assert code == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


@needs_data
def test_a_non_empty_directory_is_never_written(capsys, tmp_path, tiny_model, prefs):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "--data", prefs, "--init-from", tiny_model, "--out", out)
    assert code == 2 and "is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@needs_data
def test_end_to_end_writes_a_run_and_resumes_bit_for_bit(capsys, tmp_path, tiny_model, prefs, monkeypatch):
    common = ["--data", prefs, "--init-from", tiny_model, "--batch-size", 2, "--eval-freq", 2]
    # every sequence cut to 64 tokens (the responses keep some): one batch shape, one compile
    common += ["--eval-iter", 1, "--lr", 1e-3, "--allowed-max-length", 64, "--pad-multiple", 64]
    common += ["--sample-tokens", 0]
    whole = tmp_path / "whole"
    code, out, err = _run(capsys, *common, "--out", whole)
    assert code == 0, err
    assert "Ep 1 (Step 000000): Train loss " in out and ", Train reward margins " in out, out
    assert "Ep 1 (Step 000004): Train loss " in out and "Done: 5 steps" in out
    for name in ("metrics.jsonl", "loss.png", "margins.png"):
        assert (whole / name).is_file(), name
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3, 5]
    last = records[-1]
    assert last["train_loss"] < np.log(2) and last["train_reward_margin"] > 0  # it learned its batches
    assert 0 <= last["val_accuracy"] <= 1 and "train_chosen_reward" in last and "val_rejected_reward" in last
    # the reference stays the starting model; the run directory loads as the tuned one
    _, start = jaxgpt.load(tiny_model)
    _, reference = jaxgpt.load(whole / "reference")
    assert jax.tree.all(jax.tree.map(np.array_equal, start, reference))
    _, tuned = jaxgpt.load(whole)
    assert not np.array_equal(tuned["final_norm"]["scale"], start["final_norm"]["scale"])

    # Ctrl-C after step 3: a checkpoint, exit 130, then --resume ends exactly as the whole run
    stopper = cli._make_hooks

    def stop_at_3(*args):
        hooks = stopper(*args)

        def should_stop(step):
            if step == 3:
                cli.CtrlC.pressed = True
            return cli.CtrlC.pressed

        hooks.should_stop = should_stop
        return hooks

    part = tmp_path / "part"
    monkeypatch.setattr(cli, "_make_hooks", stop_at_3)
    code, _, err = _run(capsys, *common, "--out", part)
    assert code == 130 and "interrupted at step 3 of 5" in err and "--resume" in err, err
    monkeypatch.setattr(cli, "_make_hooks", stopper)
    code, out, err = _run(capsys, "--out", part, "--resume")
    assert code == 0 and "Resuming at step 3" in out, err
    assert (part / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    _, resumed = jaxgpt.load(part)
    assert jax.tree.all(jax.tree.map(np.array_equal, tuned, resumed))
    code, out, _ = _run(capsys, "--out", part, "--resume")
    assert code == 0 and "already complete" in out
