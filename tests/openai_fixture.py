"""The TensorFlow-written GPT-2 fixture (tests/fixtures/openai_tiny) and its Hugging Face twin.

``openai_tiny`` was written by scripts/make_openai_fixture.py with real TensorFlow. The twin is
the same seeded weights written by that script's NumPy/safetensors path, so it never goes
through jaxgpt's TensorFlow reader and can serve as an independent reference.
"""

from __future__ import annotations

import hashlib
import os
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


def fake_hub_cache(cache: Path, hf_dir: Path, repo: str = "openai-community/gpt2") -> Path:
    """A huggingface_hub cache holding ``hf_dir``'s files: blobs, a snapshot of symlinks, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        data = (hf_dir / name).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return cache
