"""Benchmarks: jaxgpt training (and generation) side by side with the PyTorch code a reader would run.

    python scripts/bench.py train                 # gpt2-small, context 256, batch 8, fp32, AdamW
    python scripts/bench.py train --dtype bfloat16 --json
    python scripts/bench.py generate ...          # greedy decode (scripts/bench_generate.py)
    python scripts/bench.py finetune ...          # classifier fine-tuning (scripts/bench_finetune.py)
    python scripts/bench.py scale mesh|stream ... # sharded steps, streaming shards (scripts/bench_scale.py)

``train`` times the library's real train step (compile separately, then the median step after a
warm-up), measures this machine's own matmul rate in the same run, and reports the fraction of it
that training reaches (model FLOPs per token = 6 N + 12 L C T: N parameters without the position
table, L layers, C width, T context; the PaLM / nanoGPT count, full attention matrix). When the
``reference`` extra is installed it then runs, in child processes of this run with the same
thread count, the training loop of Hugging Face ``GPT2LMHeadModel`` and of the book's
``llms_from_scratch.ch04.GPTModel`` on the same shapes with AdamW:

  * as a reader runs them (the default allocator),
  * under the allocator settings jaxgpt's launcher uses (the fair comparison), and when that is
    mimalloc, also under the glibc tunables (whichever PyTorch runs faster with is the fair one),
  * with bf16 autocast (when ``--dtype bfloat16``).

Children, because the allocator environment must be set before a process starts.

It also reports the host's SIMD level (AVX2, AVX-512, AVX-512-BF16, from /proc/cpuinfo) and the
level each library runs at under the variables that cap them (``XLA_FLAGS=--xla_cpu_max_isa=AVX2``,
``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``), which reproduce a host
without AVX-512 on one with it. XLA's flag does not reach YNNPACK, which runs most of XLA's matmuls,
so under it the bench caps YNNPACK at the same level itself (``--no-cap-ynnpack`` leaves it).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402

from jaxgpt.launch import allocator_env, relaunch_with_fast_allocator  # noqa: E402
from jaxgpt.xla import CPU_MATMULS, training_matmuls  # noqa: E402

# Dense peak of one accelerator chip, bf16, FLOP/s (for MFU). Matched against the device kind.
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def model_flops_per_token(n_params: int, n_layers: int, emb_dim: int, context_length: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls forward and backward, plus attention 12 L C T."""
    return 6 * n_params + 12 * n_layers * emb_dim * context_length


# --------------------------------------------------------------------------- jaxgpt


def _matmul_flops_per_s(dtype: str, n: int = 2048, repeats: int = 6) -> float:
    """Best rate of an (n, n) @ (n, n) matmul on the default device, in FLOP/s.

    bf16 inputs accumulate in float32 (``preferred_element_type``), as the model's matmuls do.
    """
    import jax
    import jax.numpy as jnp

    in_dtype = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(in_dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(in_dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _library_train_step(cfg, args):
    """(state, the library's jitted step(state, batch, key) -> (state, metrics), what it runs, in words)."""
    import jax

    from jaxgpt import train as train_lib
    from jaxgpt.loss import train_loss

    if args.loss == "logits":
        loss_fn, source = _logits_train_loss, "jaxgpt.train.train_step, the loss from full logits"
    else:
        loss_fn, source = train_loss, "jaxgpt.train.train_step"
    tcfg = train_lib.TrainConfig(learning_rate=args.lr, weight_decay=0.1, batch_size=args.batch_size)
    state, tx = train_lib.create_train_state(cfg, tcfg, jax.random.key(0), total_steps=1000)
    return state, train_lib.jit_train_step(cfg, tx, loss_fn), source


def _logits_train_loss(params, cfg, input_batch, target_batch, dropout_key):
    """The training loss the plain way: all (B, T, V) logits, then cross-entropy (same dropout)."""
    from jaxgpt.loss import cross_entropy, dropout_rng
    from jaxgpt.model import GPTModel

    rngs = {"dropout": dropout_rng(dropout_key)}
    logits = GPTModel(cfg).apply({"params": params}, input_batch, deterministic=False, rngs=rngs)
    return cross_entropy(logits, target_batch)


def model_config(args):
    """The ``GPTConfig`` that ``train`` benchmarks (ValueError for options it rejects)."""
    from jaxgpt.config import get_config

    return get_config(
        args.preset,
        context_length=args.context_length,
        dtype=args.dtype,
        activation_dtype=args.activation_dtype,
        remat=args.remat,
        drop_rate=args.drop_rate,
        scan_unroll=args.scan_unroll,
        vocab_pad_multiple=args.vocab_pad_multiple,
    )


def bench_jaxgpt_train(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.model import count_params

    cfg = model_config(args)
    B, T = args.batch_size, cfg.context_length
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
            jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
        )
        for _ in range(2)
    ]
    key = jax.random.key(1)

    state, step_fn, step_source = _library_train_step(cfg, args)
    n_params = count_params(state.params)

    jax.block_until_ready(state)  # the initialisation runs asynchronously: keep it out of the compile time
    u0 = benchlib.usage()
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], key).compile()
    compile_s = time.perf_counter() - t0
    compile_cpu_s = sum(benchlib.usage()[:2]) - sum(u0[:2])

    def run(state, i):
        state, out = compiled(state, batches[i % 2], jax.random.fold_in(key, i))
        jax.block_until_ready(out)
        return state, out

    for i in range(args.warmup):
        state, _ = run(state, i)
    times = []
    u0 = benchlib.usage()
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, out = run(state, args.warmup + i)
        times.append(time.perf_counter() - t0)
    u1 = benchlib.usage()
    loss = out["loss"]
    step_s = statistics.median(times)
    rss_mb = benchlib.peak_rss_mb()
    profile = None
    if args.profile:  # after the timed steps, so tracing costs them nothing
        profile = _profile_steps(run, state, args.profile, first=args.warmup + args.steps)

    # without the position table, and without vocabulary padding: only useful work counts
    n_flop_params = n_params - (cfg.context_length + cfg.padded_vocab_size - cfg.vocab_size) * cfg.emb_dim
    flops_tok = model_flops_per_token(n_flop_params, cfg.n_layers, cfg.emb_dim, T)
    tokens_per_s = B * T / step_s
    achieved = flops_tok * tokens_per_s
    device = jax.devices()[0]
    result = {
        "preset": args.preset,
        "context_length": T,
        "batch_size": B,
        "dtype": cfg.dtype,
        "activation_dtype": cfg.activation_dtype,
        "remat": cfg.remat,
        "scan_unroll": cfg.scan_unroll,
        "vocab_pad_multiple": cfg.vocab_pad_multiple,
        "loss": args.loss,
        "drop_rate": cfg.drop_rate,
        "step_source": step_source,
        "device": f"{device.platform}:{device.device_kind}",
        "n_params": n_params,
        "model_flops_per_token": flops_tok,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * step_s,
        "step_ms_all": [round(1000 * t, 1) for t in times],
        "compile_s": compile_s,
        "compile_cpu_s": compile_cpu_s,
        "cpu_user_s_per_step": (u1[0] - u0[0]) / args.steps,
        "cpu_sys_s_per_step": (u1[1] - u0[1]) / args.steps,
        "page_faults_per_step": (u1[2] - u0[2]) / args.steps,
        "peak_rss_mb": rss_mb,
        "final_loss": float(loss),
        "achieved_gflops": achieved / 1e9,
    }
    if device.platform == "cpu":
        peak = _matmul_flops_per_s("float32")
        result["matmul_gflops"] = peak / 1e9
        result["fraction_of_matmul_peak"] = achieved / peak
        if cfg.dtype == "bfloat16":
            peak16 = _matmul_flops_per_s("bfloat16")
            result["matmul_gflops_bf16"] = peak16 / 1e9
            result["fraction_of_bf16_matmul_peak"] = achieved / peak16
    else:
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
        peak = _matmul_flops_per_s(cfg.dtype, n=8192, repeats=10)
        result["matmul_gflops"] = peak / 1e9
        result["fraction_of_matmul_peak"] = achieved / peak
        chip_peak = next((v for k, v in GPU_BF16_PEAK.items() if k in device.device_kind), None)
        if chip_peak is not None:
            result["chip_bf16_peak_tflops"] = chip_peak / 1e12
            result["mfu"] = achieved / chip_peak
    if profile is not None:
        result["profile"] = profile
    return result


PROFILED_STEPS = 3


def _profile_steps(run, state, directory: str, first: int) -> dict:
    """``PROFILED_STEPS`` more train steps, traced and summarised."""

    def steps() -> None:
        s = state
        for i in range(PROFILED_STEPS):
            s, _ = run(s, first + i)

    return benchlib.profile_calls(steps, directory, PROFILED_STEPS)


# --------------------------------------------------------------------------- PyTorch references


def torch_reference(
    impl: str,
    model_cfg: dict,
    batch_size: int,
    steps: int,
    warmup: int,
    autocast_bf16: bool,
    threads: int,
    lr: float,
) -> dict:
    """One training loop of a PyTorch GPT-2 (runs in a child process; returns its figures).

    ``model_cfg`` is the benchmarked ``GPTConfig`` as a dict: both references are built from it.
    """
    import torch
    import torch.nn.functional as F

    from jaxgpt.config import GPTConfig

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = GPTConfig.from_dict(model_cfg)
    V, T = cfg.vocab_size, cfg.context_length
    if impl == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        from jaxgpt.weights import hf_config_from_gpt

        model = GPT2LMHeadModel(GPT2Config(**hf_config_from_gpt(cfg)))

        def forward(x):
            return model(input_ids=x).logits
    elif impl == "book":
        from llms_from_scratch.ch04 import GPTModel

        keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
        model = GPTModel({k: getattr(cfg, k) for k in keys})  # the book's GPT_CONFIG dict
        forward = model
    else:
        raise ValueError(f"unknown reference {impl!r}; expected 'hf' or 'book'")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (batch_size, T), generator=g)
    y = torch.randint(0, V, (batch_size, T), generator=g)

    def step():  # the book's train_model_simple inner loop
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = forward(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(warmup):
        step()
    times = []
    u0 = benchlib.usage()
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    u1 = benchlib.usage()
    step_s = statistics.median(times)
    return {
        "cpu_user_s_per_step": (u1[0] - u0[0]) / steps,
        "cpu_sys_s_per_step": (u1[1] - u0[1]) / steps,
        "page_faults_per_step": (u1[2] - u0[2]) / steps,
        "tokens_per_s": batch_size * T / step_s,
        "step_ms": 1000 * step_s,
        "step_ms_all": [round(1000 * t, 1) for t in times],
        "peak_rss_mb": benchlib.peak_rss_mb(),
        "final_loss": loss,
        "threads": torch.get_num_threads(),
    }


def _run_reference(name: str, impl: str, env: dict[str, str], args, autocast_bf16: bool) -> dict:
    from jaxgpt.config import get_config

    cfg = get_config(args.preset, context_length=args.context_length, drop_rate=args.drop_rate)
    spec = {
        "impl": impl,
        "model_cfg": cfg.to_dict(),
        "batch_size": args.batch_size,
        "steps": args.ref_steps,
        "warmup": 1,
        "autocast_bf16": autocast_bf16,
        "threads": args.threads,
        "lr": args.lr,
    }
    return benchlib.run_reference(name, str(Path(__file__).resolve()), "_torch_reference", spec, env)


def _references_available() -> tuple[bool, bool]:
    import importlib.util

    has_torch = importlib.util.find_spec("torch") is not None
    hf = has_torch and importlib.util.find_spec("transformers") is not None
    book = has_torch and importlib.util.find_spec("llms_from_scratch") is not None
    return hf, book


def _simd_before_any_matmul(args) -> dict:
    """The host's SIMD level and each library's (:func:`benchlib.simd_report`). Under
    ``--xla_cpu_max_isa`` at AVX2 or below, YNNPACK is first capped at the same level, unless
    ``--no-cap-ynnpack``: the flag alone leaves XLA's matmuls on the CPU's best kernels."""
    limit = benchlib.isa_limits().get("xla_codegen")
    level = benchlib.simd_report(capped={"ynnpack": limit} if limit else None)["effective"]["ynnpack"]
    host = benchlib.simd_level(benchlib.cpu_flags())
    capped, note = None, None
    if limit and level != host:
        if args.no_cap_ynnpack:
            note = "not capped (--no-cap-ynnpack)"
        else:
            note = benchlib.cap_ynnpack(level)
            capped = None if note else {"ynnpack": level}
    if limit and level != host and training_matmuls() == "onednn" and not benchlib.isa_limits().get("onednn"):
        os.environ["ONEDNN_MAX_CPU_ISA"] = level  # the step's matmuls run on oneDNN: cap it too
    report = benchlib.simd_report(capped=capped)
    if note:
        report["ynnpack_note"] = note
    return report


def cmd_train(args) -> int:
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    simd = _simd_before_any_matmul(args)
    res = bench_jaxgpt_train(args)
    res["simd"] = simd
    if res["device"].startswith("cpu"):
        res["matmuls"] = training_matmuls()
    res["load_avg_1m_before"] = load
    res["allocator_env"] = {
        k: os.environ[k] for k in os.environ.get("JAXGPT_LAUNCHER_SET", "").split(",") if k
    }
    if not args.json:
        _print_jaxgpt(res)

    refs = []
    hf_ok, book_ok = _references_available()
    wanted = [] if args.references == "none" else args.references.split(",")
    plan = []
    for impl, ok in (("hf", hf_ok), ("book", book_ok)):
        if impl not in wanted:
            continue
        if not ok:
            refs.append({"name": impl, "error": "not installed (pip install -e '.[reference]')"})
            continue
        plan.append((impl, impl, benchlib.plain_env(), False))
    if plan and res["device"].startswith("cpu"):
        first = plan[0][1]
        fast = allocator_env(benchlib.plain_env())
        if fast != benchlib.plain_env():
            plan.append((f"{first}+allocator", first, fast, False))
        tunables = allocator_env(benchlib.plain_env(), "glibc")  # PyTorch may do better with glibc kept tuned
        if "LD_PRELOAD" in fast and tunables != benchlib.plain_env():
            plan.append((f"{first}+glibc_tunables", first, tunables, False))
        if args.dtype == "bfloat16":
            plan.append((f"{first}+autocast_bf16", first, benchlib.plain_env(), True))
    elif plan:  # on an accelerator the CPU references say nothing useful
        plan = []
    for name, impl, env, autocast in plan:
        if not args.json:
            print(f"running reference {name} ...", flush=True)
        ref = _run_reference(name, impl, env, args, autocast)
        if "tokens_per_s" in ref:
            ref["ratio"] = res["tokens_per_s"] / ref["tokens_per_s"]
        refs.append(ref)
        if not args.json:
            _print_ref(ref)
    res["references"] = {r.pop("name"): r for r in refs}
    res["load_avg_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.json:
        print(json.dumps(res, indent=None, sort_keys=False))
    return 0


def _print_jaxgpt(r: dict) -> None:
    print(
        f"jaxgpt {r['preset']} T={r['context_length']} B={r['batch_size']} dtype={r['dtype']} "
        f"activations={r['activation_dtype']} "
        f"remat={r['remat']} dropout={r['drop_rate']} on {r['device']} ({r['step_source']})"
    )
    print(f"  compile_s          {r['compile_s']:.2f}")
    print(f"  step_ms (median)   {r['step_ms']:.0f}   all: {r['step_ms_all']}")
    print(f"  tokens_per_s       {r['tokens_per_s']:.1f}")
    print(
        f"  CPU s per step     user {r['cpu_user_s_per_step']:.1f}  sys {r['cpu_sys_s_per_step']:.1f}  "
        f"page faults {r['page_faults_per_step']:.0f}  (compile CPU {r['compile_cpu_s']:.1f} s)"
    )
    print(f"  peak_rss_mb        {r['peak_rss_mb']:.0f}")
    print(
        f"  model FLOPs/token  {r['model_flops_per_token'] / 1e9:.3f} GFLOP "
        f"(6N + 12 L C T, N={r['n_params']:,})"
    )
    print(f"  achieved           {r['achieved_gflops']:.1f} GFLOP/s")
    if "matmul_gflops" in r:
        shape = "fp32 2048^3" if r["device"].startswith("cpu") else f"{r['dtype']} 8192^3"
        print(f"  matmul_gflops      {r['matmul_gflops']:.1f} ({shape} jnp.dot, this run)")
        print(f"  fraction_of_matmul_peak {r['fraction_of_matmul_peak']:.2f}")
    if "matmul_gflops_bf16" in r:
        print(
            f"  matmul_gflops_bf16 {r['matmul_gflops_bf16']:.1f}  "
            f"fraction {r['fraction_of_bf16_matmul_peak']:.2f}"
        )
    if "mfu" in r:
        print(f"  mfu                {r['mfu']:.3f} of {r['chip_bf16_peak_tflops']:.0f} TFLOP/s bf16 peak")
    if "peak_device_mb" in r:
        print(f"  peak_device_mb     {r['peak_device_mb']:.0f}")
    print(f"  allocator env      {r.get('allocator_env') or 'default'}")
    if "simd" in r:
        note = f" (YNNPACK {r['simd']['ynnpack_note']})" if "ynnpack_note" in r["simd"] else ""
        print(f"  SIMD               {benchlib.simd_line(r['simd'])}{note}")
    if "matmuls" in r:
        why = "on an Intel host" if r["matmuls"] == "onednn" else "the default off Intel hosts"
        print(f"  step matmuls on    {r['matmuls']} ({why}; {CPU_MATMULS} overrides)")
    if "profile" in r:
        benchlib.print_profile(r["profile"])


def _print_ref(r: dict) -> None:
    if "error" in r:
        print(f"  reference {r['name']}: skipped ({r['error']})")
    else:
        print(
            f"  reference {r['name']:<22} {r['tokens_per_s']:7.1f} tok/s  step {r['step_ms']:.0f} ms  "
            f"rss {r['peak_rss_mb']:.0f} MB  "
            f"CPU s/step {r['cpu_user_s_per_step'] + r['cpu_sys_s_per_step']:.1f} "
            f"(sys {r['cpu_sys_s_per_step']:.1f})   jaxgpt ratio {r['ratio']:.2f}x"
        )


def cmd_report(path: str) -> int:
    """Print a saved ``train --json`` result (the file's last non-empty line) as ``train`` would."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        result = json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError, UnicodeDecodeError):
        result = None
    if not isinstance(result, dict) or "tokens_per_s" not in result:
        benchlib.bad_input("bench.py report", f"{path} holds no `bench.py train --json` result")
    _print_jaxgpt(result)
    for name, ref in (result.get("references") or {}).items():
        _print_ref({"name": name, **ref})
    return 0


def build_parser() -> benchlib.OneLineParser:
    p = benchlib.OneLineParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="training throughput vs PyTorch references",
        description="Training throughput of jaxgpt's train step, with PyTorch references.",
    )
    benchlib.add_common_args(
        t,
        dtype_help="compute dtype of the matmuls; params and AdamW state stay float32 (default float32)",
        threads_help="PyTorch threads (default: all cores, as JAX uses)",
        profile_help=f"after timing, trace {PROFILED_STEPS} more steps with jax.profiler into DIR (open it "
        "in Perfetto or TensorBoard) and print where the time goes, by kernel or op (on a CPU, XLA "
        "records its ops only under XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true)",
    )
    benchlib.add_int_flags(
        t,
        [
            ("--context-length", 256, "tokens per row (default 256, the book's)"),
            ("--batch-size", 8, "rows per step (default 8)"),
            ("--steps", 4, "timed steps after warm-up; the median is reported (default 4)"),
            ("--ref-steps", 3, "timed steps of each reference (default 3)"),
            (
                "--scan-unroll",
                1,
                "layers per iteration of the scanned block stack (GPTConfig.scan_unroll; default 1)",
            ),
            (
                "--vocab-pad-multiple",
                1,
                "pad the embedding and head to a multiple of this many rows (GPTConfig.vocab_pad_multiple; "
                "64 gives 50304; default 1, no padding). Model FLOPs count only the real vocabulary",
            ),
        ],
    )
    t.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps after compiling (default 3: under the launcher's allocator settings the "
        "heap still grows once or twice in the first steps, and first-touching new memory is slow)",
    )
    t.add_argument(
        "--activation-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the activations inside the attention and feed-forward branches "
        "(GPTConfig.activation_dtype; bfloat16 needs --dtype bfloat16; default float32)",
    )
    t.add_argument(
        "--remat",
        default="none",
        choices=["none", "full", "dots"],
        help="rematerialise each block in the backward pass (default none)",
    )
    t.add_argument(
        "--no-cap-ynnpack",
        action="store_true",
        help="under XLA_FLAGS=--xla_cpu_max_isa=AVX2 (or lower), leave YNNPACK, which runs most of XLA's "
        "matmuls and picks its kernels from the CPU's features, uncapped (by default the bench caps it "
        "at the same level, to reproduce a host without AVX-512)",
    )
    t.add_argument("--drop-rate", type=float, default=0.1, help="dropout rate (default 0.1, the book's)")
    t.add_argument(
        "--loss",
        default="chunked",
        choices=["chunked", "logits"],
        help="chunked: the library's train loss (jaxgpt.loss.train_loss: head and cross-entropy 1024 rows "
        "at a time); logits: all (B, T, V) logits, then cross-entropy, for comparison (same dropout)",
    )
    t.add_argument(
        "--lr", type=float, default=4e-4, help="AdamW learning rate (default 4e-4; weight decay 0.1)"
    )
    t.add_argument(
        "--references",
        default="hf,book",
        help="comma list of PyTorch references to run: hf, book, or 'none' (default hf,book)",
    )
    r = sub.add_parser(
        "report",
        help="print a saved `train --json` result as text",
        description="Print the result of `bench.py train --json`, saved to FILE, the way `train` prints it.",
    )
    r.add_argument("file", help="a file holding the JSON object (its last non-empty line)")
    sub.add_parser(
        "generate", help="greedy decode throughput (see scripts/bench_generate.py --help)", add_help=False
    )
    sub.add_parser(
        "finetune",
        help="a classifier fine-tuning step vs the book's chapter 6 code (see scripts/bench_finetune.py)",
        add_help=False,
    )
    sub.add_parser(
        "scale",
        help="sharded train steps and shard streaming (see scripts/bench_scale.py --help)",
        add_help=False,
    )
    return p


def check_train_args(args) -> None:
    """Exit 2 with one line naming the flag for any option the benchmark cannot run with."""
    prog = "bench.py train"

    def fail(message: str) -> NoReturn:
        benchlib.bad_input(prog, message)

    for name in ("batch_size", "context_length", "steps", "ref_steps", "scan_unroll", "vocab_pad_multiple"):
        if getattr(args, name) < 1:
            benchlib.bad_input(
                prog, f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
            )
    if args.warmup < 0:
        fail(f"--warmup must be 0 or more, got {args.warmup}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        fail(f"--lr must be a positive finite number, got {args.lr}")
    wanted = args.references.split(",")
    if args.references != "none" and not set(wanted) <= {"hf", "book"}:
        fail(f"--references must be 'none' or a comma list of hf, book; got {args.references!r}")
    try:  # the model options, checked as the config checks them, in the flags' names
        model_config(args)
    except ValueError as err:
        fail(benchlib.flag_names(str(err)).replace("preset", "--preset", 1))
    benchlib.check_output_dir(prog, "--profile", args.profile)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_torch_reference"]:  # internal: one reference loop in a child process
        spec = json.loads(argv[1])
        print(json.dumps(torch_reference(**spec)))
        return 0
    if argv[:1] == ["scale"]:  # its own process: it sets XLA_FLAGS before JAX starts
        script = str(ROOT / "scripts" / "bench_scale.py")
        os.execv(sys.executable, [sys.executable, script, *argv[1:]])
    if argv[:1] == ["generate"]:
        import bench_generate  # the decode benchmark lives beside this file

        gen_args = bench_generate.parse_args(argv[1:])  # bad flags stop here, before the relaunch
        relaunch_with_fast_allocator()  # no-op once applied, or with JAXGPT_NO_RELAUNCH=1
        return bench_generate.run(gen_args)
    if argv[:1] == ["finetune"]:
        import bench_finetune  # the classifier fine-tuning benchmark lives beside this file

        ft_args = bench_finetune.parse_args(argv[1:])
        relaunch_with_fast_allocator()
        return bench_finetune.run(ft_args)
    args = build_parser().parse_args(argv)
    if args.command == "report":  # no JAX, no relaunch: it only reads a file
        return cmd_report(args.file)
    check_train_args(args)
    relaunch_with_fast_allocator()
    return cmd_train(args)


if __name__ == "__main__":
    benchlib.run_cli("bench.py", main)
