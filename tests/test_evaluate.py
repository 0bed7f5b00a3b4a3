"""Evaluation scorers against references computed with transformers on the same (fixture) weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from openai_fixture import OPENAI_TINY, write_hf_twin

from jaxgpt.config import GPTConfig
from jaxgpt.evaluate import (
    EvalDataError,
    MultipleChoiceItem,
    lambada_split,
    perplexity,
    perplexity_windows,
    read_lambada,
    read_multiple_choice,
    score_lambada,
    score_multiple_choice,
)
from jaxgpt.pretrained import load_openai_checkpoint
from jaxgpt.tokenizer import get_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = (
    "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was no "
    "great surprise to me to hear that, in the height of his glory, he had dropped his painting, married "
    "a rich widow, and established himself in a villa on the Riviera. The height of his glory--that was "
    "what the women called it. I can hear Mrs. Gideon Thwing--his last Chicago sitter--deploring his "
    "unaccountable abdication."
)


@pytest.fixture(scope="module")
def model():
    return load_openai_checkpoint(OPENAI_TINY)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = write_hf_twin(tmp_path_factory.mktemp("twin") / "hf")
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def _token_nll(hf_model, ids: list[int]) -> np.ndarray:
    """-log p(ids[t] | ids[:t]) for t = 1.. by transformers, in float64."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


# ----------------------------------------------------------------------------- perplexity


def _guide_perplexity(hf_model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's "Perplexity of fixed-length models" loop, weighting each window's mean loss
    by the number of labels that remain after the model's internal shift (exactly its tokens)."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * counted
        n_tokens += counted
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize(("context_length", "stride"), [(32, 8), (32, 16), (32, 32), (64, 24), (16, 5)])
def test_perplexity_with_strides_equals_transformers_guide(model, hf_model, context_length, stride):
    cfg, params = model
    ids = get_tokenizer().encode(TEXT)
    assert len(ids) > context_length + stride  # at least two windows
    expected_loss, expected_tokens = _guide_perplexity(hf_model, ids, context_length, stride)
    result = perplexity(params, cfg, TEXT, context_length=context_length, stride=stride, batch_size=3)
    assert result.tokens == expected_tokens
    if stride < context_length:  # overlapping windows: every token but the very first is scored
        assert result.tokens == len(ids) - 1
    assert abs(result.loss - expected_loss) <= 1e-4, f"loss {result.loss} vs transformers {expected_loss}"
    assert math.isclose(result.perplexity, math.exp(expected_loss), rel_tol=1e-4)


def test_disjoint_windows_score_each_token_within_its_window(model, hf_model):
    # stride == context_length: each token is predicted from its own window only, and the first
    # token of each window, which has no context there, is not scored.
    cfg, params = model
    ids = get_tokenizer().encode(TEXT)[:100]
    n = 32
    nll = [x for start in range(0, len(ids), n) for x in _token_nll(hf_model, ids[start : start + n])]
    result = perplexity(params, cfg, ids, context_length=n, stride=n)
    expected = float(np.mean(nll))
    assert result.tokens == len(nll)
    assert abs(result.loss - expected) <= 1e-4


def test_windows_score_every_token_but_the_first_exactly_once():
    for n, width, stride in [(100, 32, 8), (33, 32, 1), (5, 32, 16), (64, 32, 31), (100, 32, 32)]:
        counts = np.zeros(n, int)
        windows = perplexity_windows(n, width, stride)
        for begin, end, first in windows:
            assert begin < first <= end and end - begin <= width
            counts[first:end] += 1
        unscored = [0] if stride < width else [begin for begin, _, _ in windows]  # no context there
        assert np.all(counts[unscored] == 0) and np.sum(counts) == n - len(unscored), (n, width, stride)
        assert np.all(counts <= 1) and windows[-1][1] == n


def test_perplexity_rejects_bad_arguments(model):
    cfg, params = model
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(params, cfg, [5])
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(params, cfg, TEXT, context_length=16, stride=17)
    with pytest.raises(ValueError, match="context_length must be in"):
        perplexity(params, cfg, TEXT, context_length=cfg.context_length + 1)
    small = cfg.replace(vocab_size=1000)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 1000"):
        perplexity(params, small, TEXT)
    assert isinstance(small, GPTConfig)


# ----------------------------------------------------------------------------- multiple choice

ITEMS = [
    ("A man is sitting on a roof. He", ["starts pulling up roofing on a roof.", "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube."]),  # noqa: E501
    ("The cat sat on the", ["mat.", "moon and sang a long song about cheese.", "table"]),
    ("To make tea, boil the water and", ["pour it over the leaves.", "throw the kettle out of the window.", "wait"]),  # noqa: E501
]  # fmt: skip


def _reference_choices(hf_model, items):
    """(argmin total loss, argmin mean loss) per item, by transformers, ending = " " + ending."""
    tokenizer = get_tokenizer()
    pred, pred_norm = [], []
    for context, endings in items:
        ctx = tokenizer.encode(context)
        totals, means = [], []
        for ending in endings:
            end = tokenizer.encode(" " + ending)
            nll = _token_nll(hf_model, ctx + end)[-len(end) :]
            totals.append(nll.sum())
            means.append(nll.mean())
        pred.append(int(np.argmin(totals)))
        pred_norm.append(int(np.argmin(means)))
    return pred, pred_norm


@pytest.mark.parametrize("batch_size", [1, 5])
def test_multiple_choice_agrees_with_direct_computation(model, hf_model, batch_size):
    cfg, params = model
    pred, pred_norm = _reference_choices(hf_model, ITEMS)
    # Labels chosen so the two accuracies count different things: right by total loss on item 0,
    # by mean loss on item 1, wrong by total loss on item 2.
    labels = [pred[0], pred_norm[1], (pred[2] + 1) % len(ITEMS[2][1])]
    items = [MultipleChoiceItem(c, tuple(e), lab) for (c, e), lab in zip(ITEMS, labels, strict=True)]
    result = score_multiple_choice(params, cfg, items, batch_size=batch_size)
    assert result.pred == pred and result.pred_norm == pred_norm
    assert result.acc == sum(p == lab for p, lab in zip(pred, labels, strict=True)) / 3
    assert result.acc_norm == sum(p == lab for p, lab in zip(pred_norm, labels, strict=True)) / 3
    assert result.items == 3


def test_multiple_choice_file_in_the_wrong_shape_names_the_line(tmp_path):
    good = {"ctx": "The cat sat on the", "endings": ["mat.", "moon."], "label": 0}
    cases = [
        ("not json", r":2: not a JSON object"),
        (json.dumps({**good, "endings": ["only one"]}), r":2: 'endings' must be a list of at least two"),
        (json.dumps({**good, "label": 2}), r":2: 'label' must be an index into endings \(0\.\.1\)"),
        (json.dumps({"endings": ["a", "b"], "label": 0}), r":2: 'ctx' \(or 'context'\)"),
    ]
    for line, pattern in cases:
        path = tmp_path / "hs.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(EvalDataError, match=pattern):
            read_multiple_choice(path)
    path.write_text(json.dumps({"context": "x", "endings": ["mat.", "moon."], "label": "1"}) + "\n")
    assert read_multiple_choice(path) == [MultipleChoiceItem("x", ("mat.", "moon."), 1)]


# ----------------------------------------------------------------------------- LAMBADA


def _greedy_passage(hf_model) -> str:
    """A passage whose last word is the model's own greedy choice (found by transformers)."""
    tokenizer = get_tokenizer()
    for context in ["The cat sat on the", "Every effort moves you", "He opened the door and saw a", "It was"]:
        ids = tokenizer.encode(context)
        with torch.no_grad():
            token = int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())
        word = tokenizer.decode([token])
        if word.startswith(" ") and word[1:].isalpha() and tokenizer.encode(word) == [token]:
            return context + word
    raise AssertionError("no context whose greedy next token is a word; extend the list")


def test_lambada_agrees_with_direct_computation(model, hf_model):
    cfg, params = model
    passages = [
        _greedy_passage(hf_model),
        "She poured a cup of coffee",
        "The old sailor told us a long story",
    ]
    tokenizer = get_tokenizer()
    correct, losses = [], []
    for text in passages:
        cut = text.rindex(" ")
        ctx, target = tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:])
        with torch.no_grad():
            logits = hf_model(torch.tensor([ctx + target])).logits[0]
        greedy = logits[len(ctx) - 1 : -1].argmax(-1).tolist()
        correct.append(greedy == target)
        losses.append(_token_nll(hf_model, ctx + target)[-len(target) :].sum())
    assert correct[0], "the first passage ends in the model's greedy word"
    result = score_lambada(params, cfg, passages, batch_size=2)
    assert result.correct == correct
    assert result.acc == sum(correct) / 3
    assert math.isclose(result.perplexity, math.exp(np.mean(losses)), rel_tol=1e-4)


def test_lambada_split_keeps_the_space_with_the_last_word():
    assert lambada_split("  the cat sat on the mat ") == ("the cat sat on the", " mat")


def test_lambada_files_name_the_bad_line(tmp_path):
    text = tmp_path / "l.txt"
    text.write_text("the cat sat on the mat\n\nsolitary\n")
    with pytest.raises(EvalDataError, match=r"l\.txt:3: needs a context and a last word"):
        read_lambada(text)
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"txt": "a b"}) + "\n")
    with pytest.raises(EvalDataError, match=r"l\.jsonl:2: expected a JSON object with a 'text' string"):
        read_lambada(jsonl)
    jsonl.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    text.write_text("the cat sat\n")
    assert read_lambada(jsonl) == read_lambada(text) == ["the cat sat"]
