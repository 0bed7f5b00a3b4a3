"""Calling a command-line tool's main(argv) in process, as the CLI tests do."""

from __future__ import annotations

from pathlib import Path

import pytest


def run_main(capsys, main, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main`` called with ``argv`` as strings."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def help_text(capsys, main) -> str:
    """What ``--help`` prints; it must exit 0."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def save_tiny_model(tmp_path_factory, cfg) -> Path:
    """A model of ``cfg`` with seed-0 random weights, saved as a Hugging Face directory."""
    import jax

    from jaxgpt.model import init_params
    from jaxgpt.weights import save_hf_gpt2

    path = tmp_path_factory.mktemp("model") / "tiny"
    save_hf_gpt2(cfg, init_params(cfg, jax.random.PRNGKey(0)), path)
    return path


def first_lines(tmp_path_factory, source: Path, n: int, name: str) -> Path:
    """A copy of the first ``n`` lines of ``source`` in a temporary file ``name``."""
    path = tmp_path_factory.mktemp("data") / name
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    path.write_text("".join(lines), encoding="utf-8")
    return path
