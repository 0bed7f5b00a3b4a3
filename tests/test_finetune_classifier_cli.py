"""scripts/finetune_classifier.py: bad input stops with exit 2 before any work; a tiny run end to end.

The data is the first lines of the UCI SMS Spam Collection (Almeida and Gómez Hidalgo, CC BY 4.0),
copied from ../shared/data; the tests that need it skip where it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_helpers import SHARED_DATA, first_lines, help_text, run_main, save_tiny_model
from scripts_loader import load_script

import jaxgpt
from jaxgpt.checkpoint import CheckpointManager
from jaxgpt.classify import classifier_logits, make_classifier_optimizer, read_labeled_texts
from jaxgpt.config import GPTConfig

cli = load_script("finetune_classifier")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMS = SHARED_DATA / "SMSSpamCollection"
needs_sms = pytest.mark.skipif(not SMS.is_file(), reason="the SMS Spam Collection copy is not here")
TINY = GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)  # GPT-2's 50257 ids


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def sms_head(tmp_path_factory):
    """The first 120 SMS messages (101 ham, 19 spam): 38 after balancing, 26 / 3 / 9 after the split."""
    return first_lines(tmp_path_factory, SMS, 120, "sms_head.tsv")


def _run(capsys, *argv):
    return run_main(capsys, cli.main, *argv)


def test_help_lists_exit_codes(capsys):
    out = help_text(capsys, cli.main)
    assert "Exit codes: 0 done; 2 bad input" in out and "1 a failure during training" in out and "130" in out


@needs_sms
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--max-length", "0"], "--max-length must be a positive integer"),
        (["--max-length", "65"], "--max-length: max length 65 is longer than the model's context of 64"),
        (["--trainable", "first-1"], "--trainable: trainable must be last-block, last-N with 1 <= N <= 2"),
        (["--trainable", "last-3"], "--trainable: trainable must be"),
        (["--batch-size", "100"], "fewer than --batch-size 100"),
        (["--drop-rate", "1"], "--drop-rate must be in [0, 1)"),
        (["--lora-rank", "0"], "--lora-rank must be a positive integer"),
        (["--lora-rank", "2", "--lora-alpha", "0"], "--lora-alpha must be a positive number"),
        (["--lora-rank", "2", "--trainable", "all"], "--trainable and --lora-rank exclude each other"),
    ],
)
def test_bad_options_exit_2_before_work(capsys, tmp_path, tiny_model, sms_head, extra, expected):
    out = tmp_path / "run"
    code, _, err = _run(
        capsys, "--data", sms_head, "--init-from", tiny_model, "--out", out, "--max-length", 32, *extra
    )
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not out.exists()


@needs_sms
def test_bad_inputs_exit_2_naming_what_is_wrong(capsys, tmp_path, tiny_model, sms_head):
    out = tmp_path / "run"
    no_tab = tmp_path / "no_tab.tsv"
    no_tab.write_text("ham\thello\nspam free money\n")
    cases = [
        (["--data", tmp_path / "missing.tsv", "--init-from", tiny_model], "missing.tsv: no such file"),
        (["--data", no_tab, "--init-from", tiny_model], "line 2: no tab"),
        (["--data", sms_head], "--init-from MODEL or --from-scratch"),
        (["--init-from", tiny_model], "--data is required"),
        (["--data", sms_head, "--init-from", tmp_path / "nothing"], "--init-from"),
        (["--data", sms_head, "--from-scratch", "--preset", "gpt9"], "--preset: unknown preset 'gpt9'"),
        (["--data", sms_head, "--init-from", FIXTURES / "hf_tiny"], "knows 512 token ids"),
        (["--data", sms_head, "--init-from", tiny_model, "--resume"], "holds no run to resume"),
        (["--out", tmp_path / "nothing", "--classify", "hi"], "--out"),
    ]
    for argv, expected in cases:
        code, _, err = _run(capsys, *(["--out", out] if "--out" not in argv else []), *argv)
        assert code == 2 and expected in err and err.count("\n") == 1, (argv, err)
        assert not out.exists()


def test_a_text_longer_than_the_context_names_its_line(capsys, tmp_path, tiny_model):
    data = tmp_path / "long.tsv"
    data.write_text("".join(f"{label}\t{'word ' * 70}{i}\n" for i in range(8) for label in ("ham", "spam")))
    out = tmp_path / "run"
    code, _, err = _run(capsys, "--data", data, "--init-from", tiny_model, "--out", out)
    assert code == 2 and "tokens, longer than the model's context of 64" in err and ", line " in err, err
    assert not out.exists()


def test_non_empty_out_is_refused(capsys, tmp_path, tiny_model):
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,x\nb,y\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "--data", data, "--init-from", tiny_model, "--out", out)
    assert code == 2 and "is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@needs_sms
def test_end_to_end_writes_a_run_resumes_exactly_and_classifies(capsys, tmp_path, tiny_model, sms_head):
    common = ["--data", sms_head, "--max-length", 32, "--batch-size", 4, "--eval-freq", 3, "--eval-iter", 2]
    whole = tmp_path / "whole"
    code, out, err = _run(
        capsys, *common, "--init-from", tiny_model, "--out", whole, "--epochs", 2, "--lr", 1e-3
    )
    assert code == 0, err
    assert "Ep 1 (Step 000000): Train loss " in out and "Test accuracy: " in out
    for name in ("metrics.json", "results.json", "loss.png", "accuracy.png"):
        assert (whole / name).is_file(), name
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["epochs_done"] == 2 and len(metrics["train_accs"]) == 2
    results = json.loads((whole / "results.json").read_text())
    # int(38 * 0.7) = 26, int(38 * 0.1) = 3, the rest 9
    assert results["examples"] == [26, 3, 9] and results["class_counts"] == {"ham": 101, "spam": 19}
    # the book's trainable part: the last block, the final norm (2C) and the head (2C + 2)
    _, start = jaxgpt.load(tiny_model)
    block = sum(int(np.size(leaf[-1])) for leaf in jax.tree.leaves(start["trf_blocks"]))
    C = TINY.emb_dim
    assert results["trainable_params"] == block + 2 * C + 2 * C + 2

    part = tmp_path / "part"
    code, _, err = _run(
        capsys, *common, "--init-from", tiny_model, "--out", part, "--epochs", 1, "--lr", 1e-3
    )
    assert code == 0, err
    code, out, err = _run(capsys, *common, "--out", part, "--epochs", 2, "--resume")
    assert code == 0 and "resuming" in err, err
    assert json.loads((part / "metrics.json").read_text()) == metrics
    other = tmp_path / "three.tsv"  # a class the saved head does not have
    other.write_text(sms_head.read_text(encoding="utf-8") + "eggs\tnot in the head\n", encoding="utf-8")
    code, _, err = _run(capsys, "--data", other, "--out", part, "--epochs", 3, "--resume")
    assert code == 2 and "line 121: unknown label 'eggs'; expected one of ['ham', 'spam']" in err, err
    _, a, _, _ = CheckpointManager(whole, read_only=True).restore()
    _, b, _, _ = CheckpointManager(part, read_only=True).restore()
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))

    text = "WINNER!! Claim your free prize now"
    code, out, err = _run(capsys, "--out", whole, "--classify", text)
    assert code == 0, err
    from jaxgpt.tokenizer import get_tokenizer

    ids = get_tokenizer().encode(text)
    ids = np.array([ids + [50256] * (32 - len(ids))], np.int32)
    cfg = GPTConfig.from_dict(CheckpointManager(whole, read_only=True).read_meta()[1]["model_config"])
    expected = ("ham", "spam")[int(np.argmax(classifier_logits(a, cfg, ids)[0]))]
    assert out.strip() == expected
    assert read_labeled_texts(sms_head).label_names == ("ham", "spam")


@needs_sms
def test_lora_run_trains_only_adapters_resumes_exactly_and_classifies(capsys, tmp_path, tiny_model, sms_head):
    common = ["--data", sms_head, "--max-length", 32, "--batch-size", 4, "--eval-freq", 3, "--eval-iter", 2]
    start = ["--init-from", tiny_model, "--lr", 1e-3, "--lora-rank", 2, "--lora-alpha", 4]
    whole, part = tmp_path / "whole", tmp_path / "part"
    code, _, err = _run(capsys, *common, *start, "--out", whole, "--epochs", 2)
    assert code == 0, err
    # rank 2: (in + out) * 2 per adapted kernel; C = 32: q, k, v, out (C -> C), ff (C -> 4C, 4C -> C)
    C, r = TINY.emb_dim, 2
    per_layer = 4 * (C + C) * r + 2 * (C + 4 * C) * r
    results = json.loads((whole / "results.json").read_text())
    assert results["trainable_params"] == TINY.n_layers * per_layer + (C + 2) * r

    code, _, err = _run(capsys, *common, *start, "--out", part, "--epochs", 1)
    assert code == 0, err
    code, _, err = _run(capsys, *common, "--out", part, "--epochs", 2, "--resume")
    assert code == 0, err
    assert json.loads((part / "metrics.json").read_text()) == json.loads((whole / "metrics.json").read_text())
    steps = [CheckpointManager(d, read_only=True).restore(state_like=None) for d in (whole, part)]
    assert jax.tree.all(jax.tree.map(np.array_equal, steps[0][1], steps[1][1]))  # frozen weights kept
    _, start_params = jaxgpt.load(tiny_model)
    frozen = steps[0][1]
    np.testing.assert_array_equal(
        frozen["trf_blocks"]["att"]["W_query"]["kernel"],
        start_params["trf_blocks"]["att"]["W_query"]["kernel"],
    )

    code, out, err = _run(capsys, "--out", whole, "--classify", "Free entry to win a prize")
    assert code == 0 and out.strip() in ("ham", "spam"), err


def _book_classifier(cfg: GPTConfig, num_classes: int, pth: Path):
    """The book's chapter 6 model: ``GPTModel`` with ``out_head = Linear(C, num_classes)``, loaded
    strictly from ``pth``."""
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
    model = ch04.GPTModel({k: getattr(cfg, k) for k in keys})
    model.out_head = torch.nn.Linear(in_features=cfg.emb_dim, out_features=num_classes)
    model.load_state_dict(torch.load(pth, weights_only=True))  # strict: every name and shape
    model.eval()
    return model


def _book_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64)))[:, -1, :].numpy()


@needs_sms
def test_a_classifier_run_loads_with_its_head_and_exports_to_the_books_model(
    capsys, tmp_path, tiny_model, sms_head
):
    pytest.importorskip("torch", reason="exports to the book's .pth: needs the reference extra")
    run = tmp_path / "run"
    argv = ["--data", sms_head, "--max-length", 32, "--batch-size", 4, "--epochs", 1, "--lr", 1e-3]
    code, _, err = _run(capsys, *argv, "--init-from", tiny_model, "--out", run)
    assert code == 0, err
    cfg, params = jaxgpt.load(run)
    assert jaxgpt.classifier_classes(params) == 2 and params["out_head"]["kernel"].shape == (TINY.emb_dim, 2)
    _, saved, _, _ = CheckpointManager(run, read_only=True).restore()
    ids = np.random.default_rng(0).integers(0, 50257, (3, 20)).astype(np.int32)
    ours = np.asarray(classifier_logits(params, cfg, ids))
    np.testing.assert_array_equal(ours, classifier_logits(saved, cfg, ids))

    pth = tmp_path / "spam.pth"
    code, out, err = run_main(capsys, load_script("convert").main, run, pth, "--to", "book")
    assert code == 0 and "2-class head" in out, err
    book = _book_classifier(cfg, 2, pth)
    np.testing.assert_allclose(_book_logits(book, ids), ours, atol=1e-5)
    back_cfg, back = jaxgpt.load(pth, n_heads=TINY.n_heads)  # and reads back as the same classifier
    assert jaxgpt.classifier_classes(back) == 2
    np.testing.assert_allclose(classifier_logits(back, back_cfg, ids), ours, atol=1e-5)

    code, _, err = run_main(capsys, load_script("convert").main, run, tmp_path / "hf")
    assert code == 2 and "2-class classifier" in err and "--to book" in err, err
    assert not (tmp_path / "hf").exists()
    code, _, err = run_main(capsys, load_script("generate").main, run, "--prompt", "Hello")
    assert code == 2 and "is a 2-class classifier, not a language model" in err, err
    assert "finetune_classifier.py --out RUN --classify" in err


@needs_sms
def test_a_lora_run_loads_as_the_merged_model_and_exports_it(capsys, tmp_path, tiny_model, sms_head):
    pytest.importorskip("torch", reason="exports to the book's .pth: needs the reference extra")
    from jaxgpt.lora import merge_lora

    run = tmp_path / "lora"
    argv = ["--data", sms_head, "--max-length", 32, "--batch-size", 4, "--epochs", 1, "--lr", 1e-2]
    code, _, err = _run(capsys, *argv, "--init-from", tiny_model, "--lora-rank", 2, "--out", run)
    assert code == 0, err
    cfg, params = jaxgpt.load(run)
    mngr = CheckpointManager(run, read_only=True)
    meta = mngr.read_meta()[1]
    tx = make_classifier_optimizer(meta["settings"]["learning_rate"], meta["settings"]["weight_decay"])
    state, _ = cli._restore(mngr, cfg, tx, meta["settings"], meta)
    frozen, adapters = state.frozen, state.trainable
    assert float(np.abs(adapters["out_head"]["B"]).max()) > 0  # the adapters did train
    merged = merge_lora(frozen, adapters, 16.0)  # the default --lora-alpha
    assert jax.tree.all(jax.tree.map(np.array_equal, params, merged))
    ids = np.random.default_rng(1).integers(0, 50257, (3, 20)).astype(np.int32)
    adapted = np.asarray(classifier_logits(frozen, cfg, ids, lora=(adapters, 16.0)))  # the book's way
    np.testing.assert_allclose(classifier_logits(params, cfg, ids), adapted, atol=1e-5)
    assert not np.allclose(classifier_logits(frozen, cfg, ids), adapted, atol=1e-5)

    pth = tmp_path / "lora.pth"
    code, _, err = run_main(capsys, load_script("convert").main, run, pth)
    assert code == 0, err
    np.testing.assert_allclose(_book_logits(_book_classifier(cfg, 2, pth), ids), adapted, atol=1e-5)
