"""scripts/generate.py on tiny models saved in each supported format, and on every kind of bad input."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
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
    """(exit code, stdout, stderr) of ``module.main(argv)``; argparse's exit counts as a return."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_greedy_continuation_of_a_hugging_face_model(hf_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), str(hf_dir), "--prompt", PROMPT,
         "--max-new-tokens", "9", "--ignore-eos", "--temperature", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, params = load_hf_gpt2(hf_dir)
    assert result.stdout == _reference_text(params, PROMPT, 9) + "\n"


def test_the_default_samples_with_a_fixed_seed(hf_dir, capsys):
    argv = [hf_dir, "--max-new-tokens", "8", "--ignore-eos"]
    code, first, err = _run(capsys, generate_cli, *argv)
    assert code == 0, err
    code, again, _ = _run(capsys, generate_cli, *argv)
    code, greedy, _ = _run(capsys, generate_cli, *argv, "--temperature", "0")
    assert first == again != greedy  # sampled, and the same text each time


def test_streamed_text_equals_the_printed_text(hf_dir, capsys):
    argv = [hf_dir, "--max-new-tokens", "12", "--temperature", "1.5", "--top-k", "40", "--ignore-eos"]
    code, printed, _ = _run(capsys, generate_cli, *argv, "--seed", "7")
    assert code == 0
    code, streamed, _ = _run(capsys, generate_cli, *argv, "--seed", "7", "--stream")
    assert code == 0 and streamed == printed and printed.startswith(PROMPT)
    code, other_seed, _ = _run(capsys, generate_cli, *argv, "--seed", "8")
    assert code == 0 and other_seed != printed


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
        code, out, err = _run(
            capsys, generate_cli, model, "--max-new-tokens", "5", "--ignore-eos", "--temperature", "0"
        )
        assert code == 0, err
        outs.append(out)
    assert outs[0] == outs[1] == outs[2] == _reference_text(params, PROMPT, 5) + "\n"


# ------------------------------------------------------------------------------------ bad input
# The contract of every tool (see --help): bad input exits 2 with one line naming the flag or
# file, before any work, with no traceback and nothing written; Ctrl-C exits 130 with one line.


def save_run(path: Path, cfg: GPTConfig, params) -> Path:
    """A run directory as scripts/train.py leaves it, saved through the library; returns it."""
    from jaxgpt.checkpoint import CheckpointManager

    CheckpointManager(path).save(1, params, {"step": np.int32(1)}, {"model_config": cfg.to_dict()})
    return path


def make_bad_models(root: Path) -> dict[str, Path]:
    """Every kind of model path a user can get wrong, by name, all under ``root``."""
    small = CFG.replace(vocab_size=100, n_layers=1)
    params = init_params(small, jax.random.key(0))
    paths = {"missing": root / "nowhere", "empty_dir": root / "empty", "text_file": root / "notes.txt"}
    paths["empty_dir"].mkdir()
    paths["text_file"].write_text("not a model")

    save_run(root / "damaged", small, params)
    for chunk in (root / "damaged" / "checkpoints" / "1" / "params").rglob("d/*"):
        chunk.write_bytes(b"damaged")
    paths["damaged_checkpoint"] = root / "damaged"
    # A run whose update produced NaN everywhere (issue 26: `--lr inf` once saved one)
    paths["nan_checkpoint"] = save_run(root / "nan", small, jax.tree.map(lambda x: x * jnp.nan, params))
    paths["run_without_checkpoints"] = root / "unsaved"
    paths["run_without_checkpoints"].mkdir()
    (root / "unsaved" / "config.json").write_text("{}")

    paths["random_pth"] = root / "random.pth"
    paths["random_pth"].write_bytes(np.random.default_rng(0).bytes(2048))
    paths["dict_of_lists_pth"] = root / "lists.pth"
    try:
        import torch

        torch.save({"tok_emb.weight": [[0.0]], "pos_emb.weight": [[0.0]]}, paths["dict_of_lists_pth"])
    except ImportError:  # without torch any .pth is refused by name: keep the row meaningful
        paths["dict_of_lists_pth"].write_bytes(b"")

    paths["bert_dir"] = root / "bert"
    paths["bert_dir"].mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (root / "bert" / "model.safetensors").write_bytes(b"")
    paths["broken_json"] = root / "broken_json"
    save_hf_gpt2(small, params, paths["broken_json"])
    (root / "broken_json" / "config.json").write_text("{not json")
    paths["small_vocab"] = root / "small_vocab"
    save_hf_gpt2(small, params, paths["small_vocab"])
    return paths


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return make_bad_models(tmp_path_factory.mktemp("bad"))


def listing(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file under ``root`` with its size and modification time, and every directory."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
        for p in root.rglob("*")
    }


def assert_one_line(err: str, pattern: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


# (model: a key of `bad` or "hf" for a good model, extra arguments, what the line must say)
BAD_INPUTS = [
    ("missing", [], r"nowhere does not exist: expected a Hugging Face directory"),
    ("empty_dir", [], r"empty is neither a Hugging Face directory"),
    ("text_file", [], r"notes\.txt is neither .*not named \*\.pth"),
    ("run_without_checkpoints", [], r"unsaved is neither .*config\.json but neither model\.safetensors"),
    ("damaged_checkpoint", [], r"cannot load .*damaged as a training checkpoint: .*step 1"),
    ("nan_checkpoint", [], r"nan.*(holds \d+ NaN values|non-finite)"),
    # without torch (no reference extra) any .pth is refused by name, with the extra to install
    (
        "random_pth",
        ["--n-heads", "2"],
        r"random\.pth (as a book \.pth file: torch\.load cannot read|needs torch)",
    ),
    ("dict_of_lists_pth", ["--n-heads", "2"], r"lists\.pth"),
    ("bert_dir", [], r"bert as a Hugging Face directory: .*model_type is 'bert'"),
    ("broken_json", [], r"broken_json/config\.json is not a readable JSON file"),
    ("small_vocab", [], r"vocabulary of 100 tokens.*--prompt uses token"),
    ("hf", ["--prompt", ""], r"--prompt is empty"),
    ("hf", ["--max-new-tokens", "-1"], r"--max-new-tokens: expected an integer >= 0"),
    ("hf", ["--max-new-tokens", "ten"], r"--max-new-tokens: expected an integer >= 0, got 'ten'"),
    ("hf", ["--temperature", "-0.5"], r"--temperature: expected a finite number >= 0"),
    ("hf", ["--temperature", "nan"], r"--temperature"),
    ("hf", ["--temperature", "inf"], r"--temperature"),
    ("hf", ["--top-k", "0"], r"--top-k: expected an integer >= 1"),
    ("hf", ["--top-k", "60000"], r"--top-k 60000 exceeds the model's vocabulary of 50257"),
    ("hf", ["--top-p", "1.5"], r"--top-p: expected a finite number in \(0\.0, 1\.0\]"),
    ("hf", ["--top-p", "0"], r"--top-p"),
    ("hf", ["--seed", "-3"], r"--seed: expected an integer in \[0, "),
    ("hf", ["--n-heads", "0"], r"--n-heads: expected an integer >= 1"),
    ("hf", ["--n-heads", "3"], r"records n_heads=2, but n_heads=3 was given"),
    ("hf", ["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize(
    "model, extra, message", BAD_INPUTS, ids=["-".join([m, *e]) for m, e, _ in BAD_INPUTS]
)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(bad, hf_dir, capsys, model, extra, message):
    if model == "dict_of_lists_pth":
        pytest.importorskip("torch")
    path = hf_dir if model == "hf" else bad[model]
    before = listing(path.parent), listing(hf_dir.parent)
    code, out, err = _run(capsys, generate_cli, path, "--max-new-tokens", "3", *extra)
    assert code == 2, err
    assert out == ""
    assert_one_line(err, r"^generate\.py: .*" + message)
    assert (listing(path.parent), listing(hf_dir.parent)) == before


@pytest.mark.parametrize("model", ["damaged_checkpoint", "nan_checkpoint"])
def test_a_broken_checkpoint_is_one_line_from_the_command_line_too(bad, model):
    """In a real process, where orbax's and JAX's own logging would show."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), str(bad[model])],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line(result.stderr, r"^generate\.py: ")


def test_ctrl_c_exits_130_with_one_line(hf_dir):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), str(hf_dir), "--stream", "--ignore-eos",
         "--max-new-tokens", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # mid-generation, when the main thread waits in the compiled decode loop
        assert proc.stdout.read(len(PROMPT) + 3).startswith(PROMPT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert_one_line(err, r"^generate\.py: interrupted \(Ctrl-C\)$")


def test_without_torch_a_pth_names_the_extra(bad, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    code, out, err = _run(capsys, generate_cli, bad["random_pth"], "--n-heads", "2")
    assert code == 2 and out == ""
    assert_one_line(err, r"^generate\.py: reading \S+random\.pth needs torch.*\"jaxgpt\[reference\]\"")


def test_help_documents_the_exit_codes(capsys):
    code, out, _ = _run(capsys, generate_cli, "--help")
    assert code == 0
    assert all(s in " ".join(out.split()) for s in ("Exit codes: 0 done; 2 bad input", "1 a failure", "130"))
