"""Instruction fine-tuning (chapter 7 of the book): the prompt formats.

An entry is a dict with ``instruction``, an optional ``input`` and, for training, ``output``.
The book's Alpaca-style prompt is the default; the Phi-3 style of its exercise 7.1 is the
other choice. A prompt ends just before the response, so the same text serves training
(prompt + response), generation (the prompt alone) and chat.
"""

from __future__ import annotations

from collections.abc import Mapping

PROMPT_STYLES = ("alpaca", "phi3")

_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
# What separates the prompt from the response, per style.
_RESPONSE_MARKER = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>:\n"}


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(PROMPT_STYLES)}")


def format_input(entry: Mapping[str, str], style: str = "alpaca") -> str:
    """The instruction and its optional input as the prompt text, without the response marker."""
    _check_style(style)
    extra = entry.get("input") or ""
    if style == "alpaca":
        text = f"{_ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
        return text + (f"\n\n### Input:\n{extra}" if extra else "")
    text = f"<|user|>\n{entry['instruction']}"
    return text + (f"\n{extra}" if extra else "")


def format_prompt(entry: Mapping[str, str], style: str = "alpaca") -> str:
    """The text a model continues to answer ``entry``: its input followed by the response marker."""
    return format_input(entry, style) + _RESPONSE_MARKER[style]


def format_example(entry: Mapping[str, str], style: str = "alpaca") -> str:
    """The full training text of ``entry``: its prompt followed by its ``output``."""
    return format_prompt(entry, style) + entry["output"]


def extract_response(text: str, style: str = "alpaca") -> str:
    """The response in a generated ``text``: what follows the first response marker, stripped.

    Like the book's ``text[len(prompt):].replace("### Response:", "").strip()``, later markers
    the model wrote are dropped too; a text without a marker is returned whole, stripped.
    """
    _check_style(style)
    marker = _RESPONSE_MARKER[style].strip()
    before, found, after = text.partition(marker)
    return (after if found else before).replace(marker, "").strip()
