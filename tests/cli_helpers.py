"""Calling a command-line tool's main(argv) in process, as the CLI tests do."""

from __future__ import annotations

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
