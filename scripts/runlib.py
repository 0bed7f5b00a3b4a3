"""What the training CLIs share about their run directory: Ctrl-C as a flag, the checks of a new
``--out``, creating it and undoing a new run that stopped before its first checkpoint, the
evaluation records to keep on a resume, and the checkpoint metadata a resume reads.

``scripts/train.py`` and the three ``scripts/finetune_*.py`` import this module. It imports only
the standard library at the top (JAX lazily), so ``train.py`` can install its Ctrl-C handler
before anything heavy loads. It is not in ``benchlib`` because that module is about parsing and
benchmarking, and this one about the files a run leaves behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Interrupted(Exception):
    """Ctrl-C was pressed; raised where the script can stop cleanly."""


class UsageError(ValueError):
    """A bad option or file, named in one line (exit 2)."""


class CtrlC:
    """Ctrl-C only sets a flag, which the script checks between the steps of its work.

    Raising from the handler instead could land anywhere, e.g. in JAX's garbage-collection
    callback, which swallows the exception ("Exception ignored in ...") and lets the run go on.
    A second Ctrl-C raises KeyboardInterrupt at once: stop without saving.
    """

    pressed = False

    @classmethod
    def handler(cls, signum: int, frame: object) -> None:
        """The SIGINT handler: the first Ctrl-C sets the flag, the second raises at once."""
        if cls.pressed:
            raise KeyboardInterrupt
        cls.pressed = True

    @classmethod
    @contextlib.contextmanager
    def handling(cls) -> Iterator[None]:
        """Let Ctrl-C set the flag within the block; the previous SIGINT handler comes back after it."""
        previous = signal.signal(signal.SIGINT, cls.handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @classmethod
    def check(cls) -> None:
        """Raise Interrupted if Ctrl-C was pressed."""
        if cls.pressed:
            raise Interrupted


def check_new_out(out: Path, resume_flag: str = "--resume") -> None:
    """Raise UsageError unless ``out`` is new or an empty directory, and writable; creates nothing.

    ``resume_flag`` is how the message tells to continue a run found there.
    """
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
        if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            raise UsageError(
                f"--out {out} already holds a run's checkpoints; continue it with {resume_flag} {out}"
            )
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UsageError(f"--out {out} is not empty (it holds {shown}); give a new or empty directory")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {out} cannot be written ({parent} is not a writable directory)")


def create_run_dir(out: Path) -> Path | None:
    """Create ``out`` (and missing parents); returns the topmost directory created, if any."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"output directory {out} cannot be written: {e.strerror or e}") from e
    return missing[-1] if missing else None


def undo_new_run(out: Path, created: Path | None) -> None:
    """Remove what a new run wrote: the directory ``created`` if any, else everything in ``out``."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    elif out.is_dir():
        for p in out.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def report_interrupt(lead: str, undo: bool, out: Path, created: Path | None, resume: str) -> int:
    """Ctrl-C during a run: undo a new run if ``undo`` (nothing saved yet), say so; returns 130.

    ``lead`` starts each line (the program's name, or nothing); ``resume`` is the command that
    continues a run that stays.
    """
    if undo:
        undo_new_run(out, created)
        print(f"{lead}interrupted before the first checkpoint: nothing was left behind", file=sys.stderr)
    else:
        print(f"{lead}interrupted without saving: continue with {resume}", file=sys.stderr)
    return 130


def report_stop(lead: str, step: int, total: int, saved: str, resume: str) -> int:
    """Ctrl-C stopped a run at ``step`` of ``total`` after saving (``saved`` says what); say how
    to go on (``resume``, unless the run is complete); returns 130."""
    then = resume if step < total else "the run is complete"
    print(f"{lead}interrupted at step {step} of {total}: {saved}; {then}", file=sys.stderr, flush=True)
    return 130


def read_records(path: Path, upto: int) -> list[dict[str, Any]]:
    """The evaluation records of metrics.jsonl up to step ``upto`` (later ones were not saved)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short when the process was killed
            continue
    return [r for r in records if isinstance(r, dict) and r.get("step", upto + 1) <= upto]


def read_run_meta(out: Path, kind: str, no_run: str, wrong_kind: str) -> dict[str, Any]:
    """The metadata of the latest checkpoint of the fine-tuning run in ``out``, of format ``kind``.

    Raises benchlib's InputError: ``no_run`` without a checkpoints/ directory, ``wrong_kind``
    for another format, and the checkpoint's own error for an unreadable one.
    """
    from benchlib import InputError

    from jaxgpt.checkpoint import CheckpointError, CheckpointManager

    if not (out / "checkpoints").is_dir():
        raise InputError(no_run)
    try:
        _, meta = CheckpointManager(out, read_only=True).read_meta()
    except CheckpointError as e:
        raise InputError(f"--out {out}: {e}") from None
    if meta.get("kind") != kind:
        raise InputError(wrong_kind)
    return meta
