"""OpenAI's GPT-2 by name (a Hugging Face cache in the hub's own layout) and from the book's
download (a TensorFlow checkpoint read without TensorFlow), against a fixture TensorFlow wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from openai_fixture import FILES, OPENAI_TINY, fake_hub_cache, fixture_script, write_hf_twin

from jaxgpt.model import GPTModel
from jaxgpt.pretrained import (
    CheckpointError,
    crc32c,
    from_pretrained,
    is_openai_checkpoint_dir,
    load_openai_checkpoint,
    read_tf_checkpoint,
)
from jaxgpt.weights import load_hf_gpt2

ROOT = Path(__file__).resolve().parent.parent
IDS = np.random.default_rng(0).integers(0, 50257, size=(2, 40)).astype(np.int32)


def _logits(cfg, params) -> np.ndarray:
    return np.asarray(GPTModel(cfg).apply({"params": params}, IDS))  # (2, 40, V)


@pytest.fixture(scope="module")
def hf_twin(tmp_path_factory) -> Path:
    return write_hf_twin(tmp_path_factory.mktemp("twin") / "openai_tiny_hf")


@pytest.fixture(scope="module")
def twin_logits(hf_twin) -> np.ndarray:
    return _logits(*load_hf_gpt2(hf_twin))


def _copy_fixture(tmp_path: Path) -> Path:
    path = tmp_path / "124M"
    shutil.copytree(OPENAI_TINY, path)
    return path


# ----------------------------------------------------------------------------- CRC-32C


def test_crc32c_matches_published_check_values():
    # RFC 3720 appendix B.4 and the CRC catalogue's check value for "123456789".
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_crc32c_of_long_input_equals_bitwise_definition():
    # Long inputs take the chunked path (64 chunks here, and a tail); the reference is the
    # definition itself, one bit at a time.
    data = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    reg = 0xFFFFFFFF
    for b in data:
        reg ^= b
        for _ in range(8):
            reg = (reg >> 1) ^ 0x82F63B78 if reg & 1 else reg >> 1
    assert crc32c(data) == reg ^ 0xFFFFFFFF
    assert crc32c(np.frombuffer(data, np.uint8).copy()) == reg ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------- the TensorFlow fixture


def test_tf_checkpoint_tensors_equal_the_weights_tensorflow_was_given():
    script = fixture_script()
    written = script.make_weights(script.HPARAMS, script.SEED)
    read = read_tf_checkpoint(OPENAI_TINY / "model.ckpt")
    assert sorted(read) == sorted(written)
    for name, value in written.items():
        assert read[name].dtype == np.float32 and read[name].shape == value.shape, name
        np.testing.assert_array_equal(read[name], value, err_msg=name)


def test_openai_directory_matches_hugging_face_twin_through_jaxgpt(twin_logits):
    assert is_openai_checkpoint_dir(OPENAI_TINY)
    cfg, params = load_openai_checkpoint(OPENAI_TINY)
    hp = json.loads((OPENAI_TINY / "hparams.json").read_text())
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (
        hp["n_vocab"], hp["n_ctx"], hp["n_embd"], hp["n_head"], hp["n_layer"],
    )  # fmt: skip
    assert cfg.qkv_bias and cfg.tie_embeddings
    diff = float(np.abs(_logits(cfg, params) - twin_logits).max())
    assert diff <= 1e-5, f"logits: max |diff| {diff:.3g} between the TF checkpoint and the HF twin"


def test_openai_directory_matches_transformers(hf_twin):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_twin).eval()
    with torch.no_grad():
        reference = model(torch.from_numpy(IDS).long()).logits.numpy()
    cfg, params = from_pretrained(OPENAI_TINY)
    diff = float(np.abs(_logits(cfg, params) - reference).max())
    assert diff <= 1e-5, f"logits: max |diff| {diff:.3g} between jaxgpt (TF checkpoint) and transformers"


# ----------------------------------------------------------------------------- by name, from the hub's cache


def test_name_loads_from_hub_cache_offline(tmp_path, hf_twin, twin_logits):
    cache = fake_hub_cache(tmp_path / "hub", hf_twin)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = tmp_path / "logits.npy"
    code = (
        "import sys, numpy as np, jaxgpt; from jaxgpt.model import GPTModel\n"
        "cfg, params = jaxgpt.from_pretrained('gpt2')\n"
        "ids = np.load(sys.argv[1])\n"
        "np.save(sys.argv[2], np.asarray(GPTModel(cfg).apply({'params': params}, ids)))\n"
    )
    np.save(tmp_path / "ids.npy", IDS)
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ids.npy"), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    diff = float(np.abs(np.load(out) - twin_logits).max())
    assert diff <= 1e-5, f"logits: max |diff| {diff:.3g} between the cached 'gpt2' and the HF twin"


@pytest.mark.parametrize("name", ["gpt2", "124M", "openai-community/gpt2"])
def test_names_and_aliases_resolve_to_the_same_cached_repo(tmp_path, hf_twin, twin_logits, name):
    cache = fake_hub_cache(tmp_path / "hub", hf_twin)
    cfg, params = from_pretrained(name, cache_dir=cache, local_files_only=True)
    np.testing.assert_allclose(_logits(cfg, params), twin_logits, rtol=0, atol=1e-5)


def test_name_wins_over_the_folder_the_book_download_leaves(tmp_path, monkeypatch, hf_twin, twin_logits):
    # gpt_download.py writes gpt2/124M/; from that folder's parent, "gpt2" still names the model.
    shutil.copytree(OPENAI_TINY, tmp_path / "gpt2" / "124M")
    cache = fake_hub_cache(tmp_path / "hub", hf_twin)
    monkeypatch.chdir(tmp_path)
    cfg, params = from_pretrained("gpt2", cache_dir=cache, local_files_only=True)
    np.testing.assert_allclose(_logits(cfg, params), twin_logits, rtol=0, atol=1e-5)
    cfg, params = from_pretrained("gpt2/124M")
    np.testing.assert_allclose(_logits(cfg, params), twin_logits, rtol=0, atol=1e-5)


def test_missing_model_says_what_to_download_and_where(tmp_path):
    cache = tmp_path / "empty-cache"
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained("355M", cache_dir=cache, local_files_only=True)
    message = str(e.value)
    for part in ("openai-community/gpt2-medium", str(cache), "gpt_download.py", "gpt2/355M"):
        assert part in message, f"{part!r} missing from: {message}"


def test_unknown_name_is_neither_path_nor_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a GPT-2 name"):
        from_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- broken directories


@pytest.mark.parametrize("missing", ["model.ckpt.data-00000-of-00001", "model.ckpt.index", "hparams.json"])
def test_missing_file_is_named(tmp_path, missing):
    assert missing in FILES
    path = _copy_fixture(tmp_path)
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        from_pretrained(path)


def test_only_hparams_index_and_data_are_needed(tmp_path, twin_logits):
    # The 'checkpoint' state file and the .meta graph are TensorFlow's; the weights do without them.
    path = _copy_fixture(tmp_path)
    (path / "checkpoint").unlink()
    (path / "model.ckpt.meta").unlink()
    cfg, params = from_pretrained(path)
    np.testing.assert_allclose(_logits(cfg, params), twin_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("file", ["model.ckpt.data-00000-of-00001", "model.ckpt.index"])
def test_truncated_file_is_named(tmp_path, file):
    path = _copy_fixture(tmp_path)
    data = (path / file).read_bytes()
    (path / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated") as e:
        from_pretrained(path)
    assert file in str(e.value)


def test_corrupted_tensor_fails_its_checksum(tmp_path):
    path = _copy_fixture(tmp_path)
    data_file = path / "model.ckpt.data-00000-of-00001"
    data = bytearray(data_file.read_bytes())
    data[100] ^= 0x01  # inside the first tensor the writer stored
    data_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum mismatch for tensor 'model/"):
        from_pretrained(path)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"n_layer": 3}, r"no tensor model/h2/"),  # hparams promise a layer the file lacks
        ({"n_layer": 1}, r"unexpected tensor model/h1/.*not part of GPT-2"),  # the file has a layer too many
        ({"n_embd": 16}, r"tensor 'model/wte' has shape \(50257, 8\), \S*hparams.json implies \(50257, 16\)"),
        ({"n_vocab": 50000}, r"tensor 'model/wte' has shape \(50257, 8\)"),
        ({"n_ctx": 1024}, r"tensor 'model/wpe' has shape \(64, 8\)"),
    ],
)
def test_checkpoint_disagreeing_with_hparams_names_the_tensor(tmp_path, change, pattern):
    path = _copy_fixture(tmp_path)
    hp = json.loads((path / "hparams.json").read_text())
    (path / "hparams.json").write_text(json.dumps({**hp, **change}))
    with pytest.raises(CheckpointError, match=pattern) as e:
        from_pretrained(path)
    assert "model.ckpt.index" in str(e.value) and "hparams.json" in str(e.value)


def test_bad_hparams_are_named(tmp_path):
    path = _copy_fixture(tmp_path)
    (path / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 64}))
    with pytest.raises(CheckpointError, match=r"hparams\.json: needs positive integers .*n_embd"):
        from_pretrained(path)
