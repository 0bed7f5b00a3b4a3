"""The TensorFlow-written GPT-2 fixture (tests/fixtures/openai_tiny) and its Hugging Face twin.

``openai_tiny`` was written by scripts/make_openai_fixture.py with real TensorFlow. The twin is
the same seeded weights written by that script's NumPy/safetensors path, so it never goes
through jaxgpt's TensorFlow reader and can serve as an independent reference.
"""

from __future__ import annotations

from pathlib import Path

from scripts_loader import load_script

OPENAI_TINY = Path(__file__).resolve().parent / "fixtures" / "openai_tiny"
FILES = (
    "checkpoint",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
)


def fixture_script():
    return load_script("make_openai_fixture")


def write_hf_twin(path: Path) -> Path:
    """Write the fixture's weights as a Hugging Face directory at ``path`` and return it."""
    script = fixture_script()
    script.write_hf(script.make_weights(script.HPARAMS, script.SEED), script.HPARAMS, path)
    return path
