"""Start-up step for the command-line tools: re-run the process once with a faster memory allocator.

Why: a CPU train step allocates a few very large buffers (XLA's scratch space for the step).
glibc's malloc serves buffers that large with ``mmap`` and returns them to the kernel with
``munmap`` when they are freed, so every step faults the same memory in again, page by page,
and spends much of its time in the kernel. The allocator is chosen when a process starts, so it
cannot be changed from inside Python: the CLIs call :func:`relaunch_with_fast_allocator` first
thing, which re-executes the same command once with the allocator environment added.

Two ways, the first that applies (:func:`allocator_env`):

* **mimalloc** (the ``cmeel-mimalloc`` wheel, a dependency on Linux): preloaded with
  ``LD_PRELOAD`` and told never to hand freed memory back (``MIMALLOC_PURGE_DELAY=-1``). Its
  per-thread heaps keep XLA's compiler threads off each other's locks, so compiles are faster and
  the peak memory lower than with the glibc settings below.
* **glibc tunables** (no package needed): keep freed memory (no ``mmap`` for big requests, no
  trimming), back the heap with transparent huge pages, and use one arena (XLA's worker threads
  otherwise get per-thread arenas too small for their buffers, which glibc then serves with
  ``mmap`` after all). Steps fault nothing; the single arena makes compiler threads share a lock.

docs/speed.md has the measurements. ``JAXGPT_ALLOCATOR=mimalloc|glibc`` picks one;
``JAXGPT_NO_RELAUNCH=1`` turns the step off. Harmless elsewhere: it does nothing off Linux, in an
interactive session, when the user already preloads a library (their choice wins; a tunable or
option they set is kept too), and it re-executes at most once (a marker variable guards against
loops).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

OPT_OUT = "JAXGPT_NO_RELAUNCH"  # set to 1 to keep the environment as it is
CHOICE = "JAXGPT_ALLOCATOR"  # "mimalloc", "glibc" or "auto" (the default: mimalloc when installed)
_MARK = "JAXGPT_LAUNCHER_SET"  # names of the variables the launcher added (also the loop guard)

# Never give freed memory back to the OS early (mimalloc's default purges it after 10 ms).
_MIMALLOC_OPTIONS = {"MIMALLOC_PURGE_DELAY": "-1"}

_GLIBC_TUNABLES = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=68719476736",  # 64 GiB: in practice never trim
)


def _uses_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def mimalloc_library() -> str | None:
    """Path of the ``libmimalloc.so`` that the ``cmeel-mimalloc`` wheel installs, or None.

    None also when the path could not be written into ``LD_PRELOAD`` (a space or colon in it).
    """
    try:
        files = importlib.metadata.distribution("cmeel-mimalloc").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "libmimalloc.so":
            path = Path(f.locate()).resolve()
            if path.is_file() and not any(c in str(path) for c in " :"):
                return str(path)
    return None


def _with_glibc_tunables(env: dict[str, str]) -> dict[str, str]:
    have = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    have_names = {t.split("=", 1)[0] for t in have}
    add = [t for t in _GLIBC_TUNABLES if t.split("=", 1)[0] not in have_names]  # the user's choice wins
    if add:
        env["GLIBC_TUNABLES"] = ":".join(have + add)
    return env


def allocator_env(env: Mapping[str, str], allocator: str | None = None) -> dict[str, str]:
    """``env`` with the allocator settings added (unchanged where they do not apply).

    ``allocator``: "mimalloc", "glibc" or "auto" (mimalloc when its wheel is installed, else the
    glibc tunables); default ``env["JAXGPT_ALLOCATOR"]``, else "auto". A user's own
    ``LD_PRELOAD`` rules mimalloc out.
    """
    out = dict(env)
    allocator = (allocator or out.get(CHOICE) or "auto").lower()
    if allocator not in ("auto", "mimalloc", "glibc"):
        raise ValueError(f"{CHOICE} must be 'mimalloc', 'glibc' or 'auto', got {allocator!r}")
    if not sys.platform.startswith("linux"):
        return out
    if allocator != "glibc" and not out.get("LD_PRELOAD"):
        library = mimalloc_library()
        if library is not None:
            out["LD_PRELOAD"] = library
            for name, value in _MIMALLOC_OPTIONS.items():
                out.setdefault(name, value)  # the user's value wins
            return out
        if allocator == "mimalloc":
            raise ValueError(
                f"{CHOICE}=mimalloc, but the cmeel-mimalloc wheel is not installed "
                "(pip install cmeel-mimalloc)"
            )
    if allocator != "mimalloc" and _uses_glibc():
        return _with_glibc_tunables(out)
    return out


def relaunch_with_fast_allocator() -> None:
    """Re-execute this process once with :func:`allocator_env`; returns when nothing is to be done.

    Call it before any real work (arguments are parsed again by the new process).
    """
    if os.environ.get(OPT_OUT, "") not in ("", "0") or _MARK in os.environ:
        return
    if hasattr(sys, "ps1") or sys.flags.interactive or not sys.argv or sys.argv[0] in ("", "-", "-c"):
        return  # interactive, or a program read from stdin / -c that cannot be replayed reliably
    env = allocator_env(os.environ)
    added = sorted(k for k in env if env.get(k) != os.environ.get(k))
    if not added:
        return
    env[_MARK] = ",".join(added)
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot re-execute (unusual sandbox): run on with the default allocator
        return
