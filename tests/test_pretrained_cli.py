"""Every tool takes OpenAI's GPT-2 by name or as the book's download directory, end to end.

The model is the TensorFlow-written fixture (tests/fixtures/openai_tiny, OpenAI's layout) or its
Hugging Face twin in a fake hub cache, so "gpt2" resolves offline. Each tool runs as a user runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from openai_fixture import OPENAI_TINY, fake_hub_cache, write_hf_twin

import jaxgpt

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Environment variables under which the name 'gpt2' is the fixture, from the hub's cache, offline."""
    base = tmp_path_factory.mktemp("hub")
    cache = base / "cache"
    fake_hub_cache(cache, write_hf_twin(base / "twin"))
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def _run(script: str, *args, env: dict | None = None, cwd: Path | None = None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=600,
    )


def _assert_same_params(a, b, atol=0.0):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        np.testing.assert_allclose(
            np.asarray(fa[name]), np.asarray(fb[name]), rtol=0, atol=atol, err_msg=name
        )


@pytest.mark.parametrize("model", ["dir", "name"])
def test_generate_takes_the_book_download_and_the_name(model, hub):
    target = OPENAI_TINY if model == "dir" else "gpt2"
    result = _run(
        "generate.py", target, "--prompt", "Every effort moves you", "--max-new-tokens", "5", env=hub
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Every effort moves you") and len(result.stdout) > len(
        "Every effort moves you"
    )


def test_convert_writes_the_book_download_as_hugging_face(tmp_path):
    result = _run("convert.py", OPENAI_TINY, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    _, expected = jaxgpt.from_pretrained(OPENAI_TINY)
    _, written = jaxgpt.load(tmp_path / "hf")
    _assert_same_params(written, expected)


def test_train_init_from_starts_from_the_loaded_weights(tmp_path, hub):
    text = tmp_path / "text.txt"
    text.write_text("Every effort moves you forward, one small step at a time. " * 60)
    out = tmp_path / "run"
    result = _run(
        "train.py",
        *("--init-from", "gpt2", "--data", text, "--context-length", 32, "--batch-size", 2),
        *("--max-steps", 1, "--lr", 1e-12, "--eval-freq", 1, "--eval-iter", 1, "--sample-tokens", 0),
        *("--out", out),
        env=hub,
    )
    assert result.returncode == 0, result.stderr
    cfg, params = jaxgpt.load(out)
    assert cfg.context_length == 32 and cfg.n_layers == 2
    _, fixture = jaxgpt.from_pretrained(OPENAI_TINY)
    fixture["pos_emb"]["embedding"] = fixture["pos_emb"]["embedding"][:32]  # the run keeps 32 positions
    _assert_same_params(params, fixture, atol=1e-9)  # one AdamW step of lr 1e-12 moves nothing visible


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init-from", "nowhere/at/all"], "--init-from nowhere/at/all: nowhere/at/all does not exist"),
        (["--init-from", str(OPENAI_TINY), "--preset", "quickstart"], "drop --preset"),
        (["--init-from", str(OPENAI_TINY), "--set", "n_layers=3"], "changes the shape of the model"),
        (["--init-from", str(OPENAI_TINY), "--context-length", "65"], "between 1 and its context length 64"),
    ],
)
def test_train_init_from_bad_input_exits_2(tmp_path, args, message):
    result = _run("train.py", *args, "--out", tmp_path / "run", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and sorted(tmp_path.iterdir()) == []
