"""The prompt formats against the book's chapter 7 code and its exercise 7.1 (Phi-3)."""

import json
from pathlib import Path

import pytest

from jaxgpt.instruct import extract_response, format_example, format_input, format_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"


def _entries():
    if DATA.exists():
        return json.loads(DATA.read_text())[:50]
    return [
        {"instruction": "Name a prime number.", "input": "", "output": "7"},
        {"instruction": "Rewrite in passive voice.", "input": "The cat ate it.", "output": "It was eaten."},
    ]


def test_alpaca_prompt_is_the_books_format_input():
    ch07 = pytest.importorskip("llms_from_scratch.ch07", reason="needs the reference extra")
    for entry in _entries():
        assert format_input(entry) == ch07.format_input(entry)
        # The book's training text: format_input + "\n\n### Response:\n" + output.
        assert format_example(entry) == ch07.format_input(entry) + f"\n\n### Response:\n{entry['output']}"


def test_phi3_prompt_follows_the_books_exercise():
    entry = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert format_input(entry, "phi3") == "<|user|>\nAdd the numbers.\n2 and 3"
    assert format_example(entry, "phi3") == "<|user|>\nAdd the numbers.\n2 and 3\n<|assistant|>:\n5"
    no_input = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    assert format_prompt(no_input, "phi3") == "<|user|>\nSay hi.\n<|assistant|>:\n"


def test_extract_response_matches_the_books_slicing():
    entry = {"instruction": "Name a colour.", "input": ""}
    prompt = format_input(entry)
    generated = format_prompt(entry) + "Blue.\n\n### Response:\nRed."
    # The book: generated[len(prompt):].replace("### Response:", "").strip()
    expected = generated[len(prompt) :].replace("### Response:", "").strip()
    assert extract_response(generated) == expected
    assert extract_response(format_prompt(entry, "phi3") + " Green ", "phi3") == "Green"
    assert extract_response("  no marker  ") == "no marker"


def test_unknown_style_is_named():
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'.*alpaca, phi3"):
        format_input({"instruction": "x"}, "chatml")
