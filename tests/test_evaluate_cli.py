"""scripts/evaluate.py end to end on the TensorFlow-written fixture (and by name, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import help_text, run_main
from openai_fixture import OPENAI_TINY, fake_hub_cache, write_hf_twin
from scripts_loader import load_script

from jaxgpt.evaluate import MultipleChoiceItem, perplexity, score_lambada, score_multiple_choice
from jaxgpt.pretrained import load_openai_checkpoint

ROOT = Path(__file__).resolve().parent.parent
evaluate_cli = load_script("evaluate")
TEXT = (
    "Every effort moves you forward, and every step you take brings the end of the road a little nearer. " * 3
)
HELLASWAG = [
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon and sang.", "table"], "label": 0},
    {"ctx": "To make tea, boil the water and", "endings": ["pour it.", "run away.", "wait"], "label": "2"},
]
LAMBADA = ["the cat sat on the mat", "She poured a cup of coffee"]


@pytest.fixture(scope="module")
def model():
    return load_openai_checkpoint(OPENAI_TINY)  # (cfg, params); the scorers take (params, cfg)


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG))
    lam = tmp_path / "lambada.txt"
    lam.write_text("\n".join(LAMBADA) + "\n")
    return {"text": text, "hellaswag": hs, "lambada": lam}


def _run(capsys, *argv):
    return run_main(capsys, evaluate_cli.main, *argv)


def test_help_lists_exit_codes(capsys):
    out = help_text(capsys, evaluate_cli.main)
    assert "Exit codes: 0 done; 2 bad input" in out and "1 a failure while scoring" in out and "130" in out


def test_text_perplexity_json(capsys, files, model):
    code, out, _ = _run(
        capsys, OPENAI_TINY, "--text", files["text"], "--context-length", 32, "--stride", 8, "--json"
    )
    assert code == 0
    result = json.loads(out)
    expected = perplexity(*model[::-1], TEXT, context_length=32, stride=8)
    assert result["task"] == "text" and result["tokens"] == expected.tokens
    assert result["loss"] == pytest.approx(expected.loss, abs=1e-6)
    assert result["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


def test_hellaswag_and_lambada(capsys, files, model):
    code, out, err = _run(capsys, OPENAI_TINY, "--hellaswag", files["hellaswag"], "--json", "--batch-size", 2)
    assert code == 0, err
    items = [MultipleChoiceItem(r["ctx"], tuple(r["endings"]), int(r["label"])) for r in HELLASWAG]
    expected = score_multiple_choice(*model[::-1], items)
    assert json.loads(out) == {"model": str(OPENAI_TINY), "task": "hellaswag", **expected.to_dict()}

    code, out, err = _run(capsys, OPENAI_TINY, "--lambada", files["lambada"], "--no-progress")
    assert code == 0, err
    expected = score_lambada(*model[::-1], LAMBADA)
    assert out.startswith(f"acc {expected.acc:.4f}  perplexity {expected.perplexity:.3f}  (2 passages)")
    assert err == ""  # --no-progress


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--text", "missing.txt"], "--text missing.txt: no such file"),
        (["--hellaswag", "{bad}"], ":3: 'endings' must be a list of at least two"),
        (["--lambada", "{one_word}"], ":2: needs a context and a last word"),
        (["--text", "{text}", "--stride", "0"], "--stride must be a positive integer"),
        (["--text", "{text}", "--context-length", "65"], "--context-length 65 is longer than the model's 64"),
        (["--text", "{text}", "--context-length", "16", "--stride", "17"], "--stride 17 is longer than"),
    ],
)
def test_bad_input_exits_2_naming_it(capsys, tmp_path, files, argv, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps(row) + "\n" for row in HELLASWAG) + json.dumps({"ctx": "x", "endings": ["a"]})
    )
    one_word = tmp_path / "one.txt"
    one_word.write_text("the cat sat\nsolitary\n")
    argv = [a.format(bad=bad, one_word=one_word, text=files["text"]) for a in argv]
    code, out, err = _run(capsys, OPENAI_TINY, *argv)
    assert code == 2 and out == ""
    assert err.startswith("evaluate.py: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unloadable_model_exits_2(capsys, tmp_path, files):
    code, _, err = _run(capsys, tmp_path / "nowhere", "--text", files["text"])
    assert code == 2 and "does not exist" in err and "a GPT-2 name (gpt2" in err
    broken = tmp_path / "124M"
    broken.mkdir()
    (broken / "hparams.json").write_text((OPENAI_TINY / "hparams.json").read_text())
    code, _, err = _run(capsys, broken, "--text", files["text"])
    assert code == 2 and "model.ckpt.index" in err and len(err.strip().splitlines()) == 1


def test_no_task_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main([str(OPENAI_TINY)])
    assert e.value.code == 2
    assert "one of the arguments --text --hellaswag --lambada is required" in capsys.readouterr().err


def test_by_name_offline_from_the_command_line(tmp_path, files, model):
    # Run where the book's gpt_download.py left gpt2/124M/: "gpt2" still names the hub's model.
    shutil.copytree(OPENAI_TINY, tmp_path / "gpt2" / "124M")
    cache = fake_hub_cache(tmp_path / "hub", write_hf_twin(tmp_path / "twin"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    expected = perplexity(*model[::-1], TEXT, context_length=32, stride=16)
    for name in ("gpt2", "gpt2/124M"):
        argv = [name, "--text", files["text"], "--context-length", "32", "--stride", "16", "--json"]
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "evaluate.py"), *map(str, argv)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout)["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5), name
