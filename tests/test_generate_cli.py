"""scripts/generate.py and scripts/convert.py on tiny models saved in each supported format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scripts_loader import load_script

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel, init_params
from jaxgpt.tokenizer import get_tokenizer
from jaxgpt.weights import load_hf_gpt2, save_hf_gpt2

ROOT = Path(__file__).resolve().parent.parent
# The GPT-2 vocabulary, so that any prompt tokenizes into it; everything else tiny.
CFG = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=True)
PROMPT = "Every effort moves you"


generate_cli, convert_cli = load_script("generate"), load_script("convert")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "hf"
    save_hf_gpt2(CFG, init_params(CFG, jax.random.key(0)), path)
    return path


@jax.jit
def _full_pass(params, window):
    return GPTModel(CFG).apply({"params": params}, window)  # (1, context_length, V), no cache


def _reference_text(params, prompt: str, n: int) -> str:
    """The book's crop-and-argmax loop without a cache, decoded.

    Each window is right-padded to the context length (one compile); by causality the padding
    does not change the logits at the last real position.
    """
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(prompt)
    for _ in range(n):
        window = ids[-CFG.context_length :]
        padded = jnp.asarray([window + [0] * (CFG.context_length - len(window))], jnp.int32)
        ids.append(int(jnp.argmax(_full_pass(params, padded)[0, len(window) - 1])))
    return tokenizer.decode(ids)


def _run(capsys, module, *argv):
    code = module.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_greedy_continuation_of_a_hugging_face_model(hf_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), str(hf_dir), "--prompt", PROMPT,
         "--max-new-tokens", "9", "--ignore-eos"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, params = load_hf_gpt2(hf_dir)
    assert result.stdout == _reference_text(params, PROMPT, 9) + "\n"


def test_streamed_text_equals_the_printed_text(hf_dir, capsys):
    argv = [
        hf_dir,
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.5",
        "--top-k",
        "40",
        "--seed",
        "7",
        "--ignore-eos",
    ]
    code, printed, _ = _run(capsys, generate_cli, *argv)
    assert code == 0
    code, streamed, _ = _run(capsys, generate_cli, *argv, "--stream")
    assert code == 0 and streamed == printed and printed.startswith(PROMPT)
    code, other_seed, _ = _run(capsys, generate_cli, *argv[:-2], "8", "--ignore-eos")
    assert code == 0 and other_seed != printed


def test_missing_or_incompatible_models_are_clear_errors(tmp_path, capsys):
    code, _, err = _run(capsys, generate_cli, tmp_path / "nowhere")
    assert code == 2 and "no model at" in err
    code, _, err = _run(capsys, generate_cli, tmp_path)  # an empty directory: not a checkpoint
    assert code == 2 and "cannot load" in err and "training checkpoint" in err
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    code, _, err = _run(capsys, generate_cli, bert)
    assert code == 2 and "Hugging Face" in err and "model_type" in err

    small = tmp_path / "small_vocab"
    tiny = CFG.replace(vocab_size=100)
    save_hf_gpt2(tiny, init_params(tiny, jax.random.key(0)), small)
    code, _, err = _run(capsys, generate_cli, small, "--prompt", PROMPT)
    assert code == 2 and "vocabulary has 100 tokens" in err


def test_invalid_sampling_option_is_reported(hf_dir, capsys):
    code, _, err = _run(capsys, generate_cli, hf_dir, "--temperature", "1", "--top-p", "1.5")
    assert code == 2 and "top_p" in err


def test_convert_hf_to_book_and_back_keeps_the_generated_text(hf_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    code, _, err = _run(capsys, convert_cli, hf_dir, tmp_path / "model.pth")
    assert code == 0, err
    code, _, err = _run(capsys, convert_cli, tmp_path / "model.pth", tmp_path / "back", "--n-heads", "2")
    assert code == 0, err
    texts = []
    for model in (hf_dir, tmp_path / "model.pth", tmp_path / "back"):
        extra = ["--n-heads", "2"] if str(model).endswith(".pth") else []
        code, out, err = _run(capsys, generate_cli, model, "--max-new-tokens", "6", "--ignore-eos", *extra)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] == texts[2]
    code, _, err = _run(capsys, convert_cli, hf_dir, tmp_path / "back")
    assert code == 2 and "--force" in err


def test_training_checkpoint_generates_like_its_hugging_face_export(hf_dir, tmp_path, capsys):
    checkpoint = pytest.importorskip("jaxgpt.checkpoint")
    cfg, params = load_hf_gpt2(hf_dir)
    run = tmp_path / "run"
    checkpoint.CheckpointManager(run).save(3, params, {"step": np.int32(3)}, {"model_config": cfg.to_dict()})
    code, _, err = _run(capsys, convert_cli, run, tmp_path / "exported")
    assert code == 0, err
    outs = []
    for model in (run, run / "checkpoints" / "3", tmp_path / "exported"):
        code, out, err = _run(capsys, generate_cli, model, "--max-new-tokens", "5", "--ignore-eos")
        assert code == 0, err
        outs.append(out)
    assert outs[0] == outs[1] == outs[2] == _reference_text(params, PROMPT, 5) + "\n"
