"""The CLIs' allocator launcher: which environment it builds, and that a script really re-runs with it."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import jaxgpt.launch as launch
from jaxgpt.launch import CHOICE, OPT_OUT, allocator_env, relaunch_with_fast_allocator

ROOT = Path(__file__).resolve().parent.parent
WHEEL_PLATFORM = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")


@pytest.fixture
def linux_glibc(monkeypatch):
    monkeypatch.setattr(launch.sys, "platform", "linux")
    monkeypatch.setattr(launch, "_uses_glibc", lambda: True)


def test_mimalloc_is_preloaded_and_never_purges_when_installed(linux_glibc, monkeypatch):
    monkeypatch.setattr(launch, "mimalloc_library", lambda: "/opt/lib/libmimalloc.so")
    env = allocator_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "LD_PRELOAD": "/opt/lib/libmimalloc.so", "MIMALLOC_PURGE_DELAY": "-1"}
    env = allocator_env({"MIMALLOC_PURGE_DELAY": "100"})
    assert env["MIMALLOC_PURGE_DELAY"] == "100"  # the user's option wins


def test_glibc_tunables_without_mimalloc_and_the_users_tunable_wins(linux_glibc, monkeypatch):
    monkeypatch.setattr(launch, "mimalloc_library", lambda: None)
    env = allocator_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "PATH": "/bin"})
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert "glibc.malloc.hugetlb=0" in tunables and "glibc.malloc.hugetlb=1" not in tunables
    assert {"glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0"} <= set(tunables)
    assert "LD_PRELOAD" not in env and env["PATH"] == "/bin"


def test_a_users_preload_or_choice_of_glibc_rules_mimalloc_out(linux_glibc, monkeypatch):
    monkeypatch.setattr(launch, "mimalloc_library", lambda: "/opt/lib/libmimalloc.so")
    env = allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so"})
    assert env["LD_PRELOAD"] == "/usr/lib/libjemalloc.so" and "MIMALLOC_PURGE_DELAY" not in env
    for env in (allocator_env({CHOICE: "glibc"}), allocator_env({}, "glibc")):
        assert "LD_PRELOAD" not in env and "glibc.malloc.arena_max=1" in env["GLIBC_TUNABLES"]


def test_bad_choices_fail_with_a_clear_message(linux_glibc, monkeypatch):
    with pytest.raises(ValueError, match="JAXGPT_ALLOCATOR must be .* or 'auto', got 'tcmalloc'"):
        allocator_env({CHOICE: "tcmalloc"})
    monkeypatch.setattr(launch, "mimalloc_library", lambda: None)
    with pytest.raises(ValueError, match="cmeel-mimalloc wheel is not installed"):
        allocator_env({}, "mimalloc")


def test_nothing_changes_off_linux(monkeypatch):
    monkeypatch.setattr(launch.sys, "platform", "darwin")
    assert allocator_env({"PATH": "/bin"}) == {"PATH": "/bin"}


@pytest.mark.skipif(not WHEEL_PLATFORM, reason="cmeel-mimalloc is a dependency on Linux x86_64/aarch64 only")
def test_the_dependency_provides_a_loadable_library():
    path = launch.mimalloc_library()
    assert path is not None and Path(path).is_file()
    assert Path(path).read_bytes()[:4] == b"\x7fELF"


def test_relaunch_respects_the_opt_out_and_the_loop_guard(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setenv(OPT_OUT, "1")
    relaunch_with_fast_allocator()
    monkeypatch.delenv(OPT_OUT)
    monkeypatch.setenv("JAXGPT_LAUNCHER_SET", "GLIBC_TUNABLES")  # already relaunched once
    relaunch_with_fast_allocator()
    assert calls == []


def _run_show_env(tmp_path, **extra):
    script = tmp_path / "show_env.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from jaxgpt.launch import relaunch_with_fast_allocator\n"
        "print('start', flush=True)\n"
        "relaunch_with_fast_allocator()\n"
        "maps = open('/proc/self/maps').read() if os.path.exists('/proc/self/maps') else ''\n"
        "print('mimalloc mapped' if 'libmimalloc' in maps else 'no mimalloc')\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n"
    )
    drop = ("GLIBC_TUNABLES", "LD_PRELOAD", "MIMALLOC_PURGE_DELAY", "JAXGPT_LAUNCHER_SET", OPT_OUT, CHOICE)
    env = {k: v for k, v in os.environ.items() if k not in drop} | extra
    out = subprocess.run(
        [sys.executable, str(script), "--flag", "x y"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1].endswith("['--flag', 'x y']")  # arguments survive the re-execution
    return lines


@pytest.mark.skipif(not WHEEL_PLATFORM, reason="cmeel-mimalloc is a dependency on Linux x86_64/aarch64 only")
def test_a_script_relaunches_once_with_mimalloc_loaded(tmp_path):
    lines = _run_show_env(tmp_path)
    assert lines.count("start") == 2  # ran again exactly once
    assert "mimalloc mapped" in lines  # the preload took effect in the new process


def test_a_script_relaunches_once_with_the_glibc_tunables(tmp_path):
    lines = _run_show_env(tmp_path, **{CHOICE: "glibc"})
    if launch._uses_glibc():
        assert lines.count("start") == 2
        assert "no mimalloc" in lines and "glibc.malloc.hugetlb=1" in lines[-1]
    else:
        assert lines.count("start") == 1
