"""scripts/convert.py's contract: bad sources, options and destinations exit 2 with one line and
write nothing; a failure while writing exits 1 and leaves nothing; Ctrl-C exits 130."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scripts_loader import load_script
from test_generate_cli import CFG, assert_one_line, listing, make_bad_models

from jaxgpt.model import init_params
from jaxgpt.weights import load, save_hf_gpt2

convert_cli = load_script("convert")
SMALL = CFG.replace(vocab_size=100, n_layers=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Sources, good and bad, beside an ``out`` directory holding one file and one model directory."""
    root = tmp_path_factory.mktemp("convert")
    make_bad_models(root)
    save_hf_gpt2(SMALL, init_params(SMALL, jax.random.key(0)), root / "hf")
    (root / "out").mkdir()
    (root / "out" / "old.pth").write_bytes(b"an earlier export")
    (root / "out" / "notes.txt").write_text("not a model")
    save_hf_gpt2(SMALL, init_params(SMALL, jax.random.key(1)), root / "out" / "old_hf")
    return root


def _unwritable_dir(root: Path) -> Path:
    """A directory this process cannot create files in (as root, chmod does not stop it: use /sys)."""
    locked = root / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o555)
    for candidate in (locked, Path("/sys")):
        try:
            (candidate / ".probe").touch()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    pytest.skip("no unwritable directory here")


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = convert_cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# (source, destination, extra arguments, what the one line must say); paths relative to `root`
BAD_INPUTS = [
    # sources
    ("nowhere", "out/a", [], r"nowhere does not exist: expected a Hugging Face directory"),
    ("empty", "out/a", [], r"empty is neither a Hugging Face directory"),
    ("notes.txt", "out/a", [], r"notes\.txt is neither"),
    ("unsaved", "out/a", [], r"unsaved is neither .*config\.json but neither"),
    ("damaged", "out/a", [], r"cannot load .*damaged as a training checkpoint: .*step 1"),
    ("nan", "out/a", [], r"nan.*(holds \d+ NaN values|non-finite)"),
    ("random.pth", "out/a", ["--n-heads", "2"], r"random\.pth as a book \.pth file: torch\.load cannot"),
    ("lists.pth", "out/a", ["--n-heads", "2"], r"lists\.pth"),
    ("bert", "out/a", [], r"bert as a Hugging Face directory: .*model_type is 'bert'"),
    ("broken_json", "out/a", [], r"broken_json/config\.json is not a readable JSON file"),
    ("hf", "out/a", ["--n-heads", "3"], r"records n_heads=2, but n_heads=3 was given"),
    # options
    ("hf", "out/a", ["--n-heads", "0"], r"argument --n-heads: expected an integer >= 1, got '0'"),
    ("hf", "out/a", ["--n-heads", "two"], r"argument --n-heads: expected an integer >= 1, got 'two'"),
    ("hf", "out/a", ["--to", "onnx"], r"argument --to: invalid choice: 'onnx'"),
    ("hf", "out/a", ["--overwrite"], r"unrecognized arguments: --overwrite"),
    # destinations
    ("hf", "out/old.pth", [], r"old\.pth exists; pass --force to overwrite it"),
    ("hf", "out/old_hf", [], r"old_hf exists; pass --force"),
    ("hf", "out/notes.txt", ["--force"], r"notes\.txt is a file, but a Hugging Face model is a directory"),
    ("hf", "out/old_hf", ["--to", "book", "--force"], r"old_hf is a directory, but a book \.pth is a file"),
    ("hf", "out/notes.txt/model.pth", [], r"notes\.txt is a file, so .*model\.pth cannot be created"),
    ("hf", "out/notes.txt/sub/hf", [], r"notes\.txt is a file, so"),
    ("hf", "<unwritable>/model.pth", [], r"cannot write to \S+ \(.+\)"),
    ("hf", "<unwritable>/new/hf", [], r"cannot write to"),
]


@pytest.mark.parametrize(
    "src, dst, extra, message", BAD_INPUTS, ids=["-".join([s, d, *x]) for s, d, x, _ in BAD_INPUTS]
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(root, capsys, src, dst, extra, message):
    if src.endswith(".pth") or dst.endswith(".pth"):
        pytest.importorskip("torch")
    if dst.startswith("<unwritable>"):
        dst = str(_unwritable_dir(root)) + dst[len("<unwritable>") :]
    before = listing(root)
    code, out, err = _run(capsys, root / src, root / dst, *extra)
    assert code == 2, err
    assert out == ""
    assert_one_line(err, r"^convert\.py: .*" + message)
    assert listing(root) == before


@pytest.mark.parametrize("dst", ["model.pth", "hf"])
def test_without_torch_a_book_file_names_the_extra(root, capsys, monkeypatch, dst):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    src = "hf" if dst == "model.pth" else "random.pth"
    before = listing(root)
    code, _, err = _run(capsys, root / src, root / "out" / dst)
    assert code == 2
    assert_one_line(
        err, r"a book \.pth file needs torch, which is not installed: pip install \"jaxgpt\[reference\]\""
    )
    assert listing(root) == before


@pytest.mark.parametrize("dst", ["new/dir/hf", "new/model.pth", "old_hf", "old.pth"])
def test_a_failure_while_writing_exits_1_and_leaves_nothing(root, capsys, monkeypatch, dst):
    """A full disk in the middle of the write: no temporary file, no new directory, the old export kept."""
    if dst.endswith(".pth"):
        torch = pytest.importorskip("torch")

        def full_disk(obj, f, *args, **kwargs):
            Path(f).write_bytes(b"partial")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(torch, "save", full_disk)
    else:
        import safetensors.numpy

        def full_disk(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    before = listing(root)
    code, out, err = _run(capsys, root / "hf", root / "out" / dst, "--force")
    assert code == 1, err
    assert_one_line(err, r"^convert\.py: writing .* failed \(No space left on device\); nothing was written$")
    assert listing(root) == before


def test_ctrl_c_while_writing_exits_130_and_leaves_nothing(root, capsys, monkeypatch):
    import safetensors.numpy

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted)
    before = listing(root)
    code, _, err = _run(capsys, root / "hf", root / "out" / "new" / "hf")
    assert code == 130
    assert_one_line(err, r"^convert\.py: interrupted \(Ctrl-C\); nothing was written$")
    assert listing(root) == before


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_both_files_get_the_umask_permissions(tmp_path, root, capsys, umask):
    old = os.umask(umask)
    try:
        code, out, err = _run(capsys, root / "hf", tmp_path / "hf")
    finally:
        os.umask(old)
    assert code == 0, err
    assert "Hugging Face directory" in out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "hf" / name).stat().st_mode) == 0o666 & ~umask, name


def test_force_replaces_an_existing_export_with_the_new_weights(tmp_path, root, capsys):
    save_hf_gpt2(SMALL, init_params(SMALL, jax.random.key(1)), tmp_path / "hf")
    code, _, err = _run(capsys, root / "hf", tmp_path / "hf", "--force")
    assert code == 0, err
    _, got = load(tmp_path / "hf")
    _, want = load(root / "hf")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_help_documents_the_exit_codes(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
    assert all(s in text for s in ("Exit codes: 0 done; 2 bad input", "1 a failure while writing", "130"))
