"""scripts/compare_classifier.py --init-from: chapter 6 from a saved language model, both sides alike.

The data is the first lines of the UCI SMS Spam Collection (Almeida and Gómez Hidalgo, CC BY 4.0),
copied from ../shared/data; the tests that need it skip where it is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import SHARED_DATA, first_lines, run_main, save_tiny_model
from scripts_loader import load_script

from jaxgpt.config import GPTConfig

pytest.importorskip("llms_from_scratch.ch06")
cli = load_script("compare_classifier")
SMS = SHARED_DATA / "SMSSpamCollection"
needs_sms = pytest.mark.skipif(not SMS.is_file(), reason="the SMS Spam Collection copy is not here")
# tied embeddings, as GPT-2 and jaxgpt's presets have them: the book's GPTModel has an untied head
TINY = GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def sms_head(tmp_path_factory):
    """The first 120 SMS messages: 26 / 3 / 9 examples after balancing and the split."""
    return first_lines(tmp_path_factory, SMS, 120, "sms_head.tsv")


def test_book_model_holds_the_saved_weights(tiny_model):
    # Independent of jaxgpt's export: Hugging Face reads the same directory, and its final hidden
    # state under the book model's new head gives the book model's class logits.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, cfg, params = cli._book_model(str(tiny_model))
    assert (cfg.context_length, cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (64, 32, 2, 4)
    assert cfg.drop_rate == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trf_blocks.1.", "final_norm.", "out_head.")) for n in trainable)
    assert {"out_head.weight", "out_head.bias"} <= trainable

    hf = transformers.GPT2Model.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
    with torch.no_grad():
        hidden = hf(ids).last_hidden_state[:, -1]
        expected = hidden @ model.out_head.weight.T + model.out_head.bias
        got = model.eval()(ids)[:, -1]
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


@needs_sms
def test_init_from_trains_both_sides_alike(capsys, tmp_path, tiny_model, sms_head):
    out = tmp_path / "cmp.json"
    code, stdout, err = run_main(
        capsys, cli.main, "--data", sms_head, "--init-from", tiny_model, "--steps", "2",
        "--eval-freq", "1", "--eval-iter", "2", "--json", out,
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out.read_text())
    s = r["settings"]
    assert s["init"] == f"pretrained: {tiny_model}" and s["steps_per_epoch"] == 2 and s["epochs"] == 1
    assert s["model"]["context_length"] == 64 and s["model"]["emb_dim"] == 32
    assert s["examples"] == [26, 3, 9] and s["max_length"] <= 64
    assert len(r["jaxgpt"]["losses"]) == len(r["book"]["losses"]) == 2
    np.testing.assert_allclose(r["jaxgpt"]["losses"], r["book"]["losses"], atol=1e-4)
    assert r["jaxgpt"]["accuracy"] == pytest.approx(r["book"]["accuracy"])
    assert "jaxgpt " in stdout and "book " in stdout


@needs_sms
@pytest.mark.parametrize("bad", ["missing-dir", "file.txt"])
def test_bad_init_from_exits_2_with_one_line(capsys, tmp_path, sms_head, bad):
    path = tmp_path / bad
    if bad.endswith(".txt"):
        path.write_text("not a model\n")
    code, stdout, err = run_main(capsys, cli.main, "--data", sms_head, "--init-from", path)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("compare_classifier.py: --init-from:")
    assert str(path) in err
