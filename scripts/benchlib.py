"""What the command-line tools share: one-line usage errors, parsers built from a script's
docstring, number flags, the fine-tuning tools' starting weights and option checks, Ctrl-C as
exit 130; and for the benchmarks, timing helpers, common flags, the child process that times a
reference implementation and the summary of a ``jax.profiler`` trace.

``scripts/bench.py`` and ``scripts/bench_generate.py`` both import this module (neither imports
the other), and so do generate, convert, evaluate and finetune_classifier for their parsers. JAX
is imported lazily, so a bad flag is reported before anything heavy starts.

The trace summary. ``jax.profiler.trace`` writes an XSpace file (``*.xplane.pb``) that
TensorBoard's profile plugin (``xprof``) turns into op tables. That plugin is not a dependency
here, so the bench reads the trace with ``jax.profiler.ProfileData`` and adds only what a table
in the plugin would not say on its own: the time per *step* (the trace covers several), split
into matmul / attention / other by kernel name, and on a CPU the time during which no op ran
(XLA hands some matmuls to Eigen, whose work is not traced; see docs/speed.md).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# ------------------------------------------------------------------------------ usage errors


EXIT_CODES = (
    "Exit codes: 0 done, 2 bad input (one line naming the flag or file), 1 a failure during the "
    "benchmark, 130 interrupted (Ctrl-C)."
)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``) and exit code 2, and
    whose ``--help`` ends with the exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HintParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line ending in a pointer to --help, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def number(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite ``kind`` (int or float) >= ``low`` (> with ``low_open``), <= ``high``."""
    noun = "an integer" if kind is int else "a finite number"
    if high is None:
        expected = f"{noun} {'>' if low_open else '>='} {low}"
    else:
        expected = f"{noun} in {'(' if low_open else '['}{low}, {high}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


class InputError(Exception):
    """Bad input found before any work: the tool exits with code 2 and this message."""


def load_start_model(args: argparse.Namespace):
    """(cfg, params) of a fine-tuning tool's starting weights: ``--preset`` drawn with ``--seed``
    under ``--from-scratch``, else whatever ``jaxgpt.load`` reads at ``--init-from``; dropout set
    to ``--drop-rate``. Raises InputError naming the flag."""
    import jax

    import jaxgpt

    if args.from_scratch:
        try:
            cfg = jaxgpt.get_config(args.preset)
        except ValueError as e:
            raise InputError(f"--preset: {e}") from None
        cfg = cfg.replace(drop_rate=args.drop_rate)
        return cfg, jaxgpt.init_params(cfg, jax.random.PRNGKey(args.seed))
    try:
        cfg, params = jaxgpt.load(args.init_from)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise InputError(f"--init-from {args.init_from}: {e}") from None
    return cfg.replace(drop_rate=args.drop_rate), params


def check_fine_tuning_options(
    args: argparse.Namespace,
    positive: tuple[tuple[str, float | None], ...] = (),
    non_negative: tuple[tuple[str, float], ...] = (),
) -> None:
    """Raise InputError for the first bad option of a fine-tuning tool: --epochs, --batch-size,
    --eval-freq, --eval-iter and each ``(flag, value)`` of ``positive`` given and below 1, one of
    ``non_negative`` below 0, then --lr, --weight-decay and --drop-rate."""
    shared = (
        ("--epochs", args.epochs),
        ("--batch-size", args.batch_size),
        ("--eval-freq", args.eval_freq),
        ("--eval-iter", args.eval_iter),
    )
    for flag, value in shared + tuple(positive):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    for flag, value in non_negative:
        if value < 0:
            raise InputError(f"{flag} must be an integer >= 0, got {value}")
    if not args.lr > 0:
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    if not args.weight_decay >= 0:
        raise InputError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.drop_rate < 1:
        raise InputError(f"--drop-rate must be in [0, 1), got {args.drop_rate}")


def exit_on_interrupt(prog: str, lead: str = "") -> None:
    """Make Ctrl-C end a tool that writes no file at once, with exit 130 and one line, even while
    its main thread waits in a compiled decode (which runs no Python signal handler until it
    ends): SIGINT is blocked in this thread and every later one, and one waiting thread takes it.
    ``lead`` goes before the line (a newline, to leave a half-printed reply). POSIX only; elsewhere
    Ctrl-C stays the main thread's KeyboardInterrupt."""
    if not hasattr(signal, "pthread_sigmask"):
        return

    def wait() -> None:
        signal.sigwait({signal.SIGINT})
        os.write(2, f"{lead}{prog}: interrupted (Ctrl-C)\n".encode())
        os._exit(130)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=wait, name="ctrl-c", daemon=True).start()


def use_compilation_cache() -> None:
    """Keep compiled programs on disk (jaxgpt's persistent XLA cache), so a second run of the same
    shapes loads them instead of compiling; nothing happens where jaxgpt cannot be imported."""
    try:
        from jaxgpt.xla import enable_compilation_cache
    except ImportError:
        return
    enable_compilation_cache()


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, top_k_help: str) -> None:
    """The sampling flags generate.py and chat.py share: --temperature (default ``temperature``),
    --top-k, --top-p and --seed, each checked by :func:`number` as it is parsed."""
    p.add_argument(
        "--temperature",
        type=number(float, 0.0),
        default=temperature,
        help="0 = greedy; > 0 samples from softmax(logits / temperature) (default: %(default)s)",
    )
    p.add_argument("--top-k", type=number(int, 1), help=top_k_help)
    p.add_argument(
        "--top-p",
        type=number(float, 0.0, 1.0, low_open=True),
        help="sample only from the nucleus of this probability mass, in (0, 1]",
    )
    p.add_argument(
        "--seed",
        type=number(int, 0, 2**32 - 1),
        default=123,
        help="seed of the sampling key (default: %(default)s)",
    )


def doc_parser(prog: str, doc: str, cls: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A ``cls`` parser for a script: the description is its docstring's first paragraph, and the
    epilog the paragraphs after the usage examples (what it reads, exit codes)."""
    return cls(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_int_flags(p: argparse.ArgumentParser, flags: list[tuple[str, int | None, str]]) -> None:
    """``(flag, default, help)`` rows of positive-integer flags."""
    for flag, default, help_text in flags:
        p.add_argument(flag, type=positive_int, default=default, help=help_text)


def bad_input(prog: str, message: str) -> NoReturn:
    """Stop with exit code 2 and one line naming the flag or file (``message``)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(prog: str, main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s code, or 130 and one line on Ctrl-C."""
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    raise SystemExit(code)


def flag_names(message: str) -> str:
    """``GPTConfig.drop_rate must ...`` -> ``--drop-rate must ...``: errors in the user's words."""
    return re.sub(r"GPTConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def check_output_dir(prog: str, flag: str, path: str | None) -> None:
    """Exit 2 unless ``path`` is a directory that exists or could be made (nothing is created)."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        bad_input(prog, f"{flag} {path} is a file, not a directory")
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        bad_input(prog, f"{flag} {path} cannot be created: {parent} is not a directory")
    import os

    if not os.access(parent, os.W_OK | os.X_OK):
        bad_input(prog, f"{flag} {path} cannot be written: {parent} is not writable")


def add_common_args(
    p: argparse.ArgumentParser, *, dtype_help: str, threads_help: str, profile_help: str
) -> None:
    """The flags both benchmarks take: --preset, --dtype, --threads, --profile, --json."""
    p.add_argument("--preset", default="gpt2-small", help="model preset (default gpt2-small)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help=dtype_help)
    p.add_argument("--threads", type=positive_int, default=None, help=threads_help)
    p.add_argument("--profile", metavar="DIR", default=None, help=profile_help)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


# ------------------------------------------------------------------------------ timing


def plain_env() -> dict[str, str]:
    """The environment a reader's PyTorch runs in: this one without what the launcher added."""
    env = dict(os.environ)
    for name in env.pop("JAXGPT_LAUNCHER_SET", "").split(","):
        if name:
            env.pop(name, None)
    return env


def run_reference(name: str, script: str, command: str, spec: dict, env: dict[str, str]) -> dict:
    """Run ``script command SPEC`` (a reference implementation, in a child with exactly ``env``)
    and return the JSON of its last line with ``name`` added, or ``{"name", "error"}`` with the
    tail of its output when it fails."""
    import json
    import subprocess

    cmd = [sys.executable, script, command, json.dumps(spec)]
    child_env = {**env, "JAXGPT_NO_RELAUNCH": "1"}  # the child runs with exactly this environment
    proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"name": name, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["name"] = name
    return out


def usage() -> tuple[float, float, int]:
    """(user CPU s, system CPU s, minor page faults) of this process so far.

    CPU seconds per step barely move when other processes share the cores, unlike wall time, so
    the benches report them too; page faults show what the allocator costs.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime, ru.ru_minflt


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------ SIMD level

# x86 SIMD levels from the lowest, with the /proc/cpuinfo flags each needs (AVX-512: the F, BW, VL
# and DQ subsets every AVX-512 CPU since Skylake-SP has).
SIMD_LEVELS = (
    ("SSE4.2", ("sse4_2",)),
    ("AVX", ("avx",)),
    ("AVX2", ("avx2", "fma")),
    ("AVX-512", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    ("AVX-512-BF16", ("avx512_bf16",)),
)
# The names each library's ISA limit takes, mapped to the levels above (case-insensitive).
_LIMIT_NAMES = {
    "sse4_2": "SSE4.2", "sse41": "SSE4.2", "avx": "AVX", "avx2": "AVX2", "avx2_vnni": "AVX2",
    "avx512": "AVX-512", "avx512_core": "AVX-512", "avx512_vnni": "AVX-512", "avx512_core_vnni": "AVX-512",
    "avx512_bf16": "AVX-512-BF16", "avx512_core_bf16": "AVX-512-BF16", "default": None, "all": None,
}  # fmt: skip
# The libraries whose ISA the two sides' steps depend on, with a short label, and the variable that
# caps each: XLA's fused loops (LLVM), XLA's YNNPACK dots, oneDNN (XLA's Eigen dots, some PyTorch
# ops), PyTorch's own kernels, MKL (PyTorch's float32 matmuls). YNNPACK picks its kernels from the
# CPU's features and no variable caps it (see :func:`cap_ynnpack` and docs/speed.md).
SIMD_COMPONENTS = (
    ("xla_codegen", "XLA codegen", "XLA_FLAGS=--xla_cpu_max_isa"),
    ("ynnpack", "YNNPACK", None),
    ("onednn", "oneDNN", "ONEDNN_MAX_CPU_ISA"),
    ("aten", "ATen", "ATEN_CPU_CAPABILITY"),
    ("mkl", "MKL", "MKL_ENABLE_INSTRUCTIONS"),
)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (its first ``flags`` line); empty if unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def simd_level(flags: set[str]) -> str:
    """The highest of :data:`SIMD_LEVELS` whose flags (and those of every level below) ``flags`` has."""
    level = "unknown"
    for name, needs in SIMD_LEVELS:
        if not set(needs) <= flags:
            break
        level = name
    return level


def _level_index(level: str | None) -> int:
    names = [name for name, _ in SIMD_LEVELS]
    return names.index(level) if level in names else len(names)


def isa_limits(env: dict[str, str] | None = None) -> dict[str, str]:
    """The ISA caps set in ``env`` (default ``os.environ``), per :data:`SIMD_COMPONENTS` name, as
    written there (XLA's from ``--xla_cpu_max_isa=`` in ``XLA_FLAGS``)."""
    import os

    env = dict(os.environ if env is None else env)
    limits = {}
    match = re.search(r"--xla_cpu_max_isa=(\S+)", env.get("XLA_FLAGS", ""))
    if match:
        limits["xla_codegen"] = match.group(1)
    onednn = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    for name, value in (
        ("onednn", onednn),
        ("aten", env.get("ATEN_CPU_CAPABILITY")),
        ("mkl", env.get("MKL_ENABLE_INSTRUCTIONS")),
    ):
        if value:
            limits[name] = value
    return limits


def simd_report(
    flags: set[str] | None = None, env: dict[str, str] | None = None, capped: dict[str, str] | None = None
) -> dict:
    """The host's SIMD level and, per library of :data:`SIMD_COMPONENTS`, the level it runs at.

    A library runs at the lower of the host's level and its cap: the variables of ``env`` (default
    ``os.environ``), or ``capped`` ({library: level}) for caps applied otherwise (:func:`cap_ynnpack`).
    """
    host = simd_level(cpu_flags() if flags is None else flags)
    limits = isa_limits(env)
    effective = {}
    for name, _, _ in SIMD_COMPONENTS:
        cap = limits.get(name) or (capped or {}).get(name)
        level = _LIMIT_NAMES.get(cap.lower(), cap) if cap else None
        effective[name] = level if level and _level_index(level) < _level_index(host) else host
    return {"host": host, "limits": {**limits, **(capped or {})}, "effective": effective}


def simd_line(report: dict) -> str:
    """One line for the bench's text output: the host's level, then what differs from it, per library."""
    lowered = [
        f"{label} {report['effective'][name]}"
        for name, label, _ in SIMD_COMPONENTS
        if report["effective"][name] != report["host"]
    ]
    line = f"host {report['host']}"
    if lowered:
        line += "; limited: " + ", ".join(lowered)
    return line


# YNNPACK keeps the features it read with cpuid in one cached word; bits 0-6 are SSE2, SSSE3, SSE4.1,
# AVX, F16C, AVX2 and FMA3 in every version seen, the AVX-512 and AMX bits above them.
_YNN_KEEP = {"AVX2": 0x7F, "AVX": 0x1F, "SSE4.2": 0x07}
_YNN_SYMBOLS = ("_ZN3ynn24get_supported_arch_flagsEv", "_ZZN3ynn24get_supported_arch_flagsEvE5flags")


def cap_ynnpack(level: str) -> str | None:
    """Make XLA's YNNPACK dots use kernels of at most ``level`` (AVX2, AVX or SSE4.2); None when done,
    else why not.

    ``--xla_cpu_max_isa`` caps only the code XLA generates; YNNPACK, which runs most of XLA's
    matmuls, picks its kernels from the CPU's features, read once and cached. This reads them
    through YNNPACK's own function and clears the bits above ``level`` in the cached word, found by
    its symbol in jaxlib's symbol table (with ``nm``). A benchmark device, to reproduce a host
    without AVX-512 on one with it: call it before the first matmul runs.
    """
    import ctypes
    import os
    import shutil
    import subprocess

    keep = _YNN_KEEP.get(level)
    if keep is None:
        return f"no YNNPACK cap for {level}"
    if not sys.platform.startswith("linux") or shutil.which("nm") is None:
        return "needs Linux and nm (binutils)"
    import jaxlib

    lib = Path(jaxlib.__file__).parent / "libjax_common.so"
    if not lib.is_file():
        return f"{lib.name} not found"
    import jax

    jax.devices("cpu")  # loads the library
    symbols = {}
    listing = subprocess.run(["nm", str(lib)], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in _YNN_SYMBOLS:
            symbols[parts[2]] = int(parts[0], 16)
    if len(symbols) != len(_YNN_SYMBOLS):
        return "YNNPACK's feature word is not in jaxlib's symbol table"
    real, base = os.path.realpath(lib), None
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and int(fields[2], 16) == 0 and os.path.realpath(fields[5]) == real:
            base = int(fields[0].split("-")[0], 16)
            break
    if base is None:
        return f"{lib.name} is not mapped in this process"
    read = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + symbols[_YNN_SYMBOLS[0]])
    features = read()  # fills the cache if nothing has yet
    word = ctypes.c_uint64.from_address(base + symbols[_YNN_SYMBOLS[1]])
    if word.value != features:
        return "YNNPACK's feature word is not where its symbol says"
    word.value = features & keep
    return None


# ------------------------------------------------------------------------------ trace summary

_KERNEL_KINDS = (  # by name: cuBLAS / CUTLASS / cuDNN kernels, XLA CPU's YNNPACK / oneDNN / Eigen dots
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn::fusion")),
    (
        "matmul",
        ("gemm", "xmma", "cutlass", "nvjet", "gemv", "cublas", "wgmma", "ynn_fusion", "onednn", "dot"),
    ),
)
# Events on XLA's CPU threads that are not ops: the executor's wrappers, an op's end marker and
# the thread pool's bookkeeping.
_CPU_NOT_OPS = ("ThunkExecutor::", "SlinkyThreadPool::", "end: ", "ThreadpoolListener::")


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in _KERNEL_KINDS if any(k in low for k in keys)), "other")


def _self_times(events: list[tuple[float, float, str]]) -> dict[str, float]:
    """Per name, the time of one thread's (start, duration, name) events outside those nested in them."""
    out: dict[str, float] = defaultdict(float)
    stack: list[tuple[float, float, str]] = []  # the enclosing events
    for start, dur, name in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] + stack[-1][1] <= start:
            stack.pop()
        if stack:
            out[stack[-1][2]] -= dur  # the enclosing event's own time excludes this one
        stack.append((start, dur, name))
        out[name] += dur
    return out


def _no_op_time(events: list[tuple[float, float, str]]) -> float:
    """Time within the span of ``events`` (any threads) during which none of them was running."""
    intervals = sorted((start, start + dur) for start, dur, _ in events)
    if not intervals:
        return 0.0
    idle, reach = 0.0, intervals[0][1]
    for start, end in intervals[1:]:
        idle += max(0.0, start - reach)
        reach = max(reach, end)
    return idle


def summarize_trace(directory: str, n_steps: int, top: int = 25) -> dict:
    """Where a step's time goes, from the newest ``*.xplane.pb`` under ``directory``.

    On an accelerator: the kernels on the ``Stream`` lines of the ``/device:`` planes (kernels a
    CUDA graph runs side by side each count in full). On a CPU: the ops on XLA's pool threads
    (``tf_XLAEigen`` lines of ``/host:CPU``), each without the ops nested in it; XLA records them
    only under ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true``. Per step, in ms: the total, by
    kind (matmul, attention, other: fused elementwise, reductions, copies) and the ``top`` ops by
    name; on a CPU also ``no_op_ms_per_step``, the time between the first and last op during which
    no op ran on any thread (not idle: Eigen's untraced matmul work runs then).
    """
    from jax.profiler import ProfileData

    traces = sorted(Path(directory).rglob("*.xplane.pb"), key=lambda q: q.stat().st_mtime)
    if not traces:
        return {"error": f"no .xplane.pb trace under {directory}"}
    profile = ProfileData.from_file(str(traces[-1]))
    planes = list(profile.planes)  # an iterator: read once

    def lines(plane_prefix: str, line_prefix: str) -> list[list[tuple[float, float, str]]]:
        return [
            [(e.start_ns, e.duration_ns, e.name) for e in line.events]
            for plane in planes
            if plane.name.startswith(plane_prefix)
            for line in plane.lines
            if line.name.startswith(line_prefix)
        ]

    per_kernel: dict[str, float] = defaultdict(float)
    device_lines = lines("/device:", "Stream")
    ops: list[tuple[float, float, str]] = []
    for events in device_lines:  # kernels do not nest
        for _, dur, name in events:
            per_kernel[name] += dur
    if not device_lines:
        for events in lines("/host:CPU", "tf_XLAEigen"):
            for name, dur in _self_times(events).items():
                if not name.startswith(_CPU_NOT_OPS):
                    per_kernel[name] += dur
            ops += [e for e in events if not e[2].startswith(_CPU_NOT_OPS)]
    if not per_kernel:
        return {
            "error": "no device kernels or XLA CPU ops in the trace (on a CPU, run with "
            "XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true)",
            "trace": str(traces[-1]),
        }
    total = sum(per_kernel.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, dur in per_kernel.items():
        by_kind[kernel_kind(name)] += dur
    ms = 1e-6 / n_steps  # XSpace times are in nanoseconds
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {
        "trace": str(traces[-1]),
        **({} if device_lines else {"no_op_ms_per_step": _no_op_time(ops) * ms}),
        "kernel_ms_per_step": total * ms,
        "by_kind_ms_per_step": {k: v * ms for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name[:160], "kind": kernel_kind(name), "ms_per_step": dur * ms, "share": dur / total}
            for name, dur in ranked
        ],
    }


def profile_calls(work: Callable[[], Any], directory: str, n_steps: int) -> dict:
    """Run ``work()`` (``n_steps`` steps) under ``jax.profiler.trace`` and :func:`summarize_trace` it."""
    import jax

    try:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            work()
        return summarize_trace(directory, n_steps)
    except Exception as err:  # e.g. no CUPTI, or a trace laid out otherwise: the bench's figures stand
        return {"error": f"{type(err).__name__}: {err}"}


def print_profile(prof: dict, per: str = "step", top: int | None = None) -> None:
    """The text form of :func:`profile_calls`'s result (times per ``per``: a step, or a decode step)."""
    if "error" in prof:
        print(f"  profile            {prof['error']}")
        return
    kinds = "  ".join(f"{k} {v:.1f}" for k, v in prof["by_kind_ms_per_step"].items())
    print(f"  profile            {prof['kernel_ms_per_step']:.1f} ms per {per} in kernels or ops: {kinds}")
    if "no_op_ms_per_step" in prof:
        print(
            f"    {prof['no_op_ms_per_step']:7.2f} ms with no op on any thread"
            f" (Eigen's untraced work for dot.N ops, and gaps between {per}s)"
        )
    for k in prof["top_kernels"][:top]:
        print(f"    {k['ms_per_step']:7.2f} ms {100 * k['share']:5.1f}%  {k['kind']:<9} {k['name'][:90]}")
    print(f"  trace              {prof['trace']}")
