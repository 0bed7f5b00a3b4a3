"""Start-up step for the command-line tools: re-run the process once with a faster memory allocator.

Why: a CPU training step allocates a few very large buffers (for gpt2-small at context 256 and
batch 8: a 1024-row chunk of logits is 206 MB, the head's gradient 154 MB). glibc's malloc serves such
buffers with ``mmap`` and gives them back to the kernel with ``munmap`` when they are freed, so
every step faults the same gigabytes in again, page by page. Telling glibc to keep freed memory
(``GLIBC_TUNABLES``) removes most of that cost. Tunables are read once when a process starts, so
they cannot be set from inside Python: the CLIs call :func:`relaunch_with_fast_allocator` first
thing, which re-executes the same command once with the setting added.

Trade-off: the process keeps the memory it has used, and the single arena fragments: the heap
grows once or twice during the first steps, then stays (gpt2-small, batch 8, context 256: RSS
6.4 GB after the first step, 10.6 GB from about the fourth on).

Harmless elsewhere: it does nothing off Linux/glibc, in an interactive session, when the
setting is already there, or when ``JAXGPT_NO_RELAUNCH=1`` (the opt-out). It re-executes at most
once (a marker variable guards against loops).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

OPT_OUT = "JAXGPT_NO_RELAUNCH"  # set to 1 to keep the environment as it is
_MARK = "JAXGPT_LAUNCHER_SET"  # names of the variables the launcher added (also the loop guard)

# Keep freed memory in the process: never serve a request from a private mmap (so nothing is
# unmapped on free), never trim the heap top, and back the heap with transparent huge pages. One
# arena: XLA's worker threads otherwise get per-thread arenas whose heaps are capped at 64 MiB,
# so glibc serves their big buffers with mmap after all (measured: 5k huge-page faults and 1.3 s
# of system time per gpt2-small step with it, none without).
_GLIBC_TUNABLES = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=68719476736",  # 64 GiB: in practice never trim
)


def _uses_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def allocator_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the allocator settings added (unchanged where they do not apply or are set)."""
    out = dict(env)
    if not _uses_glibc():
        return out
    have = [t for t in out.get("GLIBC_TUNABLES", "").split(":") if t]
    have_names = {t.split("=", 1)[0] for t in have}
    add = [t for t in _GLIBC_TUNABLES if t.split("=", 1)[0] not in have_names]  # the user's choice wins
    if add:
        out["GLIBC_TUNABLES"] = ":".join(have + add)
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
