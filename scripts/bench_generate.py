"""Generation benchmark: jaxgpt's KV-cache decode against Hugging Face ``GPT2LMHeadModel.generate``.

    python scripts/bench_generate.py                      # gpt2-small, 100 new tokens, B=1 and B=8
    python scripts/bench_generate.py --batch-sizes 1 --json
    python scripts/bench_generate.py --threads 1          # Hugging Face on one thread (a busy machine)
    python scripts/bench_generate.py --temperature 1.4 --top-k 25   # sampled, the book's 5.3 settings
    python scripts/bench_generate.py --prompt-tokens 800  # decoding at a long context
    python scripts/bench.py generate ...                  # the same, through the benchmark harness
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python scripts/bench_generate.py --profile DIR
                                                          # and where a decode step's time goes

Both models get the same random gpt2-small weights' shapes (GPT-2's config: tied head, qkv bias),
the same prompt repeated over the batch (the book's 4 tokens, or ``--prompt-tokens`` long), greedy
decoding with a KV cache (or, with ``--temperature``, sampling with the same temperature, top-k and
top-p on both sides), and exactly ``--new-tokens`` new tokens (no eos). jaxgpt's compile time (the
first call minus a timed call) is reported apart from its tokens/s; tokens/s is batch * new tokens
/ the median of ``--repeats`` timed calls. Hugging Face runs in the same process afterwards with
``torch.set_num_threads`` equal to the cores JAX uses (or ``--threads``); the ratio is jaxgpt
tokens/s over Hugging Face tokens/s. CPU seconds per call (all threads) are printed beside wall
time, and the load average before and after, because wall-clock figures on a shared machine move
with the load.

At batch 1 a decode step reads every weight once and does little else, so its ceiling is the
rate at which this machine streams weights through a matrix-vector product. The bench measures
that rate in the same run (a 512 MB float32 ``x @ W`` with x of one row, the decode's own
operation, the same with W read transposed, or a plain read of W, whichever is fastest) and
reports the bound, bandwidth / weight bytes per token, and the fraction of it that B=1 decoding
reaches.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402

PROMPT = "Every effort moves you"  # the book's running example


def _weight_stream_gb_per_s(repeats: int = 10) -> float:
    """Best rate, in GB/s, at which the default device reads a 512 MB float32 matrix W (K, N).

    The fastest of ``x (1, K) @ W`` (what decoding does), ``x @ W.T`` with W read as (N, K), and
    the row sums of W (a plain streaming read; XLA on CPU reads row by row much faster than
    column by column), best of ``repeats`` each, so the bound derived from it is never the
    looser one.
    """
    import jax
    import jax.numpy as jnp

    K, N = 4096, 32768
    w = jax.random.normal(jax.random.key(0), (K, N), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, K), jnp.float32)
    xt = jax.random.normal(jax.random.key(2), (1, N), jnp.float32)
    best = float("inf")
    candidates = (
        (jax.jit(jnp.dot), (x, w)),
        (jax.jit(lambda x, w: x @ w.T), (xt, w)),
        (jax.jit(lambda w: w.sum(axis=1)), (w,)),
    )
    for fn, args in candidates:
        fn(*args).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return w.nbytes / best / 1e9


def bench_jaxgpt(
    cfg,
    params,
    prompt_ids: list[int],
    batch_size: int,
    new_tokens: int,
    repeats: int,
    profile_dir: Path | None = None,
    sampling: dict | None = None,
) -> dict:
    import jax
    import numpy as np

    from jaxgpt.generation import generate

    ids = np.tile(np.asarray(prompt_ids, np.int32)[None], (batch_size, 1))  # (B, T)
    sample = {} if sampling is None else {**sampling, "key": jax.random.key(0)}

    def run():
        return jax.block_until_ready(generate(params, cfg, ids, new_tokens, **sample))

    t0, c0 = time.perf_counter(), time.process_time()
    first = run()
    first_s, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    c0 = time.process_time()
    run_s = benchlib.median_time(run, repeats)
    run_cpu = (time.process_time() - c0) / repeats
    profile = None
    if profile_dir is not None:  # one more call, traced; per decode step: one new token per row
        profile = benchlib.profile_calls(run, str(profile_dir), new_tokens)
    return {
        "name": "jaxgpt",
        "batch_size": batch_size,
        "compile_s": round(max(first_s - run_s, 0.0), 2),
        "compile_cpu_s": round(max(first_cpu - run_cpu, 0.0), 2),
        "run_s": round(run_s, 3),
        "run_cpu_s": round(run_cpu, 3),
        "tokens_per_s": round(batch_size * new_tokens / run_s, 1),
        "new_ids": np.asarray(first)[0, len(prompt_ids) :].tolist(),
        **({} if profile is None else {"profile": profile}),
    }


def bench_hf(
    cfg,
    prompt_ids: list[int],
    batch_size: int,
    new_tokens: int,
    repeats: int,
    threads: int,
    sampling: dict | None = None,
) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaxgpt.weights import hf_config_from_gpt

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**hf_config_from_gpt(cfg))).eval()
    ids = torch.tensor([prompt_ids] * batch_size, dtype=torch.long)
    mask = torch.ones_like(ids)
    if sampling is None:
        decoding = {"do_sample": False}
    else:  # top_k=0 and top_p=1.0 switch off Hugging Face's own defaults (top_k=50)
        decoding = {
            "do_sample": True,
            "temperature": sampling["temperature"],
            "top_k": sampling["top_k"] or 0,
            "top_p": sampling["top_p"] or 1.0,
        }

    def run(n):
        with torch.inference_mode():
            return model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                use_cache=True,
                pad_token_id=0,
                **decoding,
            )

    run(4)  # warm-up
    c0 = time.process_time()
    run_s = benchlib.median_time(lambda: run(new_tokens), repeats)
    run_cpu = (time.process_time() - c0) / repeats
    return {
        "name": "hf_generate",
        "batch_size": batch_size,
        "threads": threads,
        "run_s": round(run_s, 3),
        "run_cpu_s": round(run_cpu, 3),
        "tokens_per_s": round(batch_size * new_tokens / run_s, 1),
    }


def _print_row(name: str, r: dict, inside: str, after: str) -> None:
    """One result line: tokens/s, then wall and CPU seconds per call (and ``inside``), then ``after``."""
    print(
        f"{name:<16} B={r['batch_size']:<3} {r['tokens_per_s']:8.1f} tok/s  "
        f"({r['run_s']:.2f} s, {r['run_cpu_s']:.2f} CPU s per call{inside})  {after}",
        flush=True,
    )


def build_parser() -> benchlib.OneLineParser:
    p = benchlib.OneLineParser(prog="bench_generate.py", description=__doc__.split("\n\n")[0])
    benchlib.add_common_args(
        p,
        dtype_help="jaxgpt's matmul dtype; bfloat16 reads half the weight bytes per token (default float32)",
        threads_help="PyTorch threads (default: the cores JAX uses)",
        profile_help="after timing, run one more call per batch size under jax.profiler (into DIR/B<batch>) "
        "and print where a decode step's time goes (one new token per row), by kernel or op (on a "
        "CPU, XLA records its ops only under XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true)",
    )
    benchlib.add_int_flags(
        p,
        [
            ("--new-tokens", 100, "tokens generated per row (default 100)"),
            (
                "--prompt-tokens",
                None,
                "a prompt of this many tokens (the book's prompt repeated) instead of its 4, to decode at a "
                "long context; each call's time includes the prompt's pass (default: the book's prompt)",
            ),
            ("--repeats", 3, "timed calls per measurement; the median counts (default 3)"),
            ("--top-k", None, "with --temperature: keep the k likeliest tokens"),
        ],
    )
    p.add_argument("--batch-sizes", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 decodes greedily (default); above 0 both sides sample with it (the book's 5.3: 1.4)",
    )
    p.add_argument("--top-p", type=float, default=None, help="with --temperature: nucleus sampling")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face reference")
    return p


def parse_args(argv: list[str] | None = None):
    """The parsed flags, or exit 2 with one line naming the flag that is wrong."""
    import math

    args = build_parser().parse_args(argv)
    prog = "bench_generate.py"

    def fail(message: str) -> NoReturn:
        benchlib.bad_input(prog, message)

    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        fail(f"--batch-sizes must be a comma list of positive integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        fail("--batch-sizes must be a comma list of positive integers")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        fail(f"--temperature must be 0 (greedy) or a positive number, got {args.temperature}")
    if args.temperature == 0 and (args.top_k, args.top_p) != (None, None):
        fail("--top-k and --top-p need --temperature > 0 (0 is greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        fail(f"--top-p must be in (0, 1], got {args.top_p}")
    from jaxgpt.config import PRESETS

    if args.preset not in PRESETS:
        fail(f"--preset {args.preset!r} is not one of {sorted(PRESETS)}")
    context = PRESETS[args.preset].context_length
    if args.prompt_tokens is not None and args.prompt_tokens + args.new_tokens > context:
        fail(
            f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} "
            f"exceed {args.preset}'s context_length {context}",
        )
    benchlib.check_output_dir(prog, "--profile", args.profile)
    return args


def run(args) -> int:
    """The benchmark for flags from :func:`parse_args`."""
    batch_sizes = args.batch_sizes
    sampling = None
    if args.temperature > 0:
        sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}

    import jax
    import jax.numpy as jnp

    from jaxgpt.config import get_config
    from jaxgpt.model import count_params, init_params
    from jaxgpt.tokenizer import get_tokenizer

    # GPT-2's own layout (qkv bias, tied head), as Hugging Face builds it
    cfg = get_config(args.preset, qkv_bias=True, drop_rate=0.0, dtype=args.dtype)
    prompt_ids = get_tokenizer().encode(PROMPT)
    if args.prompt_tokens is not None:
        prompt_ids = (prompt_ids * args.prompt_tokens)[: args.prompt_tokens]
    params = init_params(cfg, jax.random.key(0))
    threads = args.threads or os.cpu_count() or 1

    result = {
        "preset": args.preset,
        "dtype": args.dtype,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "sampling": sampling,
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "simd": benchlib.simd_report(),  # the host's SIMD level, and each library's under ISA caps
        "jaxgpt": [],
        "hf": [],
    }
    # bytes of weights one decode step reads: every matrix and vector, the token table as the head;
    # of the position table only one row
    n_read = count_params(params) - (cfg.context_length - 1) * cfg.emb_dim
    weight_bytes = n_read * jnp.dtype(cfg.dtype).itemsize
    bandwidth = _weight_stream_gb_per_s()
    result["weight_bytes_per_token"] = weight_bytes
    result["weight_stream_gb_per_s"] = round(bandwidth, 2)
    result["bound_tokens_per_s_b1"] = round(bandwidth * 1e9 / weight_bytes, 1)
    if not args.json:
        print(f"SIMD: {benchlib.simd_line(result['simd'])}")
        print(
            f"weights read per token {weight_bytes / 1e6:.0f} MB; they stream at {bandwidth:.1f} GB/s here, "
            f"so B=1 can reach at most {result['bound_tokens_per_s_b1']:.1f} tok/s",
            flush=True,
        )
    for b in batch_sizes:
        profile_dir = None if args.profile is None else Path(args.profile) / f"B{b}"
        r = bench_jaxgpt(cfg, params, prompt_ids, b, args.new_tokens, args.repeats, profile_dir, sampling)
        if b == 1:
            r["fraction_of_bound"] = round(r["tokens_per_s"] / result["bound_tokens_per_s_b1"], 3)
        result["jaxgpt"].append(r)
        if not args.json:
            bound = f"  {r['fraction_of_bound']:.0%} of the bound" if "fraction_of_bound" in r else ""
            after = f"compile {r['compile_s']:.1f} s ({r['compile_cpu_s']:.1f} CPU s){bound}"
            _print_row("jaxgpt", r, "", after)
            if "profile" in r:
                benchlib.print_profile(r["profile"], per="decode step", top=12)
    if not args.no_hf:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            result["hf_error"] = f"transformers/torch not importable: {e}"
        else:
            for b, mine in zip(batch_sizes, result["jaxgpt"], strict=True):
                r = bench_hf(cfg, prompt_ids, b, args.new_tokens, args.repeats, threads, sampling)
                r["ratio"] = round(mine["tokens_per_s"] / r["tokens_per_s"], 2)
                r["cpu_ratio"] = round(r["run_cpu_s"] / mine["run_cpu_s"], 2)
                result["hf"].append(r)
                if not args.json:
                    after = f"jaxgpt/hf tok/s {r['ratio']:.2f}x, hf/jaxgpt CPU s {r['cpu_ratio']:.2f}x"
                    _print_row("hf generate", r, f", {threads} threads", after)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        for r in result["jaxgpt"]:
            r.pop("new_ids")
        print(json.dumps(result))
    else:
        print(
            f"load average before {result['load_average_before']}, after {result['load_average_after']} "
            f"({result['cpu_count']} cores, {result['device']})"
        )
        if "hf_error" in result:
            print(f"hf reference skipped: {result['hf_error']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    benchlib.run_cli("bench_generate.py", main)
