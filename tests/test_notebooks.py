"""The book-companion notebooks run end to end and show what they claim.

Each notebook (a jupytext "percent" script under ``notebooks/``) asserts its own key facts — LayerNorm
variance 1, the shortcut network's gradients, 124,412,160 tied parameters, the causal mask's zero
upper triangle, ... — so running it is the test: a notebook that raises, or that shows the wrong
thing, fails here. They run as the user would run them (``python notebooks/chNN_*.py``), in a
subprocess, with ``JAXGPT_QUICK=1`` (short training runs) and the figures written to a temporary
folder, whose expected files are then checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# notebook -> the figures it must write
EXPECTED_FIGURES = {
    "ch02_text_data.py": ["ch02_sliding_windows.png", "ch02_batch_noise.png"],
    "ch03_attention.py": ["ch03_causal_attention.png", "ch03_attention_dropout.png"],
    "ch04_gpt_model.py": ["ch04_gelu_relu.png", "ch04_shortcut_gradients.png", "ch04_pre_vs_post_ln.png"],
    "ch05_pretraining.py": [
        "ch05_training_loss.png",
        "ch05_temperature.png",
        "ch05_top_k_top_p.png",
        "ch05_book_table.png",
    ],
    "ch06_classification.py": ["ch06_loss.png", "ch06_accuracy.png", "ch06_confusion.png"],
    "ch07_instruction_finetuning.py": ["ch07_padded_batch.png", "ch07_losses.png", "ch07_dpo_margins.png"],
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _present(names):
    return [n for n in names if (NOTEBOOKS / n).exists()]


def _run_notebook(name: str, figures: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("JAXGPT_VERDICT", None)  # the quick run never trains on the book's text
    env.pop("JAXGPT_TORCH_REFERENCE", None)
    # ch05's GPT-2 section reads the tiny model TensorFlow wrote in OpenAI's layout, as the book's
    # gpt_download.py leaves it.
    env["JAXGPT_GPT2"] = str(ROOT / "tests" / "fixtures" / "openai_tiny")
    env.update(
        JAXGPT_QUICK="1",
        JAXGPT_FIGURES=str(figures),
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return subprocess.run(
        [sys.executable, str(NOTEBOOKS / name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_every_chapter_has_a_notebook():
    assert sorted(p.name for p in NOTEBOOKS.glob("ch0*.py")) == sorted(EXPECTED_FIGURES)


@pytest.mark.parametrize("name", _present(EXPECTED_FIGURES))
def test_notebook_runs_and_writes_its_figures(name, tmp_path):
    result = _run_notebook(name, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} failed (exit {result.returncode}):\n{output[-6000:]}"
    chapter = name[:4]  # "ch02"
    assert f"{chapter}: all checks passed" in result.stdout, f"{name} ended early:\n{output[-3000:]}"
    for figure in EXPECTED_FIGURES[name]:
        path = tmp_path / figure
        assert path.is_file(), (
            f"{name} did not write {figure}; wrote {sorted(p.name for p in tmp_path.iterdir())}"
        )
        assert path.read_bytes()[:8] == PNG_MAGIC, f"{figure} is not a PNG file"


@pytest.mark.parametrize("name", _present(EXPECTED_FIGURES))
def test_notebook_is_a_percent_script_whose_sections_name_the_book(name):
    """The file opens as a notebook (jupytext percent format) and every section cites the book."""
    text = (NOTEBOOKS / name).read_text(encoding="utf-8")
    assert "format_name: percent" in text.split("# ---", 2)[1], f"{name} lacks the jupytext header"
    cells = re.split(r"^# %%", text, flags=re.M)[1:]
    markdown = [c for c in cells if c.startswith(" [markdown]")]
    code = [c for c in cells if not c.startswith(" [markdown]")]
    assert len(markdown) >= 4 and len(code) >= 4, f"{name}: {len(markdown)} markdown, {len(code)} code cells"
    sections = re.findall(r"^# ## (.+)$", text, flags=re.M)
    assert sections, f"{name} has no sections"
    for title in sections:
        assert re.match(r"\d\.\d+(\.\d+)?(–\d\.\d+)? ", title), (
            f"{name}: section {title!r} names no book section"
        )
    try:
        import jupytext
    except ImportError:
        return  # the plain-text checks above still ran
    notebook = jupytext.reads(text, fmt="py:percent")
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds.count("markdown") == len(markdown) and kinds.count("code") >= len(code)
