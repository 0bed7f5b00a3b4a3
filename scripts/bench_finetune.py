"""Fine-tuning benchmark: one classifier training step of jaxgpt against the book's chapter 6 code.

    python scripts/bench.py finetune                     # gpt2-small, B=8, 120 tokens: last block, LoRA
    python scripts/bench.py finetune --modes lora --json
    python scripts/bench_finetune.py --preset quickstart --max-length 32 --steps 2   # a quick look

Both sides train the same shapes: a ``--preset`` model with the query/key/value biases GPT-2's
weights have (chapter 6's ``BASE_CONFIG``) and a two-class head, batches of
``--batch-size`` texts padded to ``--max-length`` tokens (the book's spam data pads to 120), AdamW
at the book's 5e-5 and weight decay 0.1, dropout off, as chapter 6 fine-tunes. Two settings:

  * ``last-block``: the book's chapter 6 choice, the last transformer block, the final norm and the
    new head train (the book sets ``requires_grad``; jaxgpt cuts the params in two,
    ``jaxgpt.classify.partition_params``),
  * ``lora``: appendix E, every weight frozen and rank ``--lora-rank`` adapters scaled by
    ``--lora-alpha`` on every linear of the blocks and the head (the book's
    ``replace_linear_with_lora``; jaxgpt's ``jaxgpt.lora``).

jaxgpt runs the library's jitted step (``jit_classifier_train_step``, ``jit_lora_train_step``):
the compile timed apart, then the median of ``--steps`` steps after ``--warmup``. For each setting
the book's PyTorch code (``llms_from_scratch.ch04.GPTModel``, ``ch06.calc_loss_batch``,
``appendix_e.replace_linear_with_lora``: the body of ``train_classifier_simple``) then runs the same
step in a child process of this run, with as many threads as JAX uses: as a reader runs it, and
under jaxgpt's allocator settings when they differ (the faster is the fair comparison). The
settings take turns (jaxgpt, the book, the next setting ...), so a change of load on a shared
machine falls on both sides of a ratio. Examples/s is batch size / median step time.
"""

from __future__ import annotations

import json
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

PROG = "bench.py finetune"
MODES = ("last-block", "lora")
NUM_CLASSES = 2


def machine() -> str:
    """The CPU's model name (as lscpu prints it) and the number of cores this process may use."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _batches(vocab_size: int, batch_size: int, length: int, n: int = 2):
    """``n`` (inputs (B, T), labels (B,)) int64 batches, the same on both sides."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [
        (rng.integers(0, vocab_size, (batch_size, length)), rng.integers(0, NUM_CLASSES, (batch_size,)))
        for _ in range(n)
    ]


def _timed(step, batches, steps: int, warmup: int) -> dict:
    """Median wall time of ``steps`` calls of ``step(batch)`` after ``warmup``, with CPU time per step."""
    loss = None
    for i in range(warmup):
        loss = step(batches[i % len(batches)])
    times = []
    u0 = benchlib.usage()
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(batches[(warmup + i) % len(batches)])
        times.append(time.perf_counter() - t0)
    u1 = benchlib.usage()
    return {
        "step_ms": 1000 * statistics.median(times),
        "step_ms_all": [round(1000 * t, 1) for t in times],
        "cpu_s_per_step": (u1[0] - u0[0] + u1[1] - u0[1]) / steps,
        "final_loss": float(loss),
    }


# --------------------------------------------------------------------------- jaxgpt


def bench_jaxgpt(mode: str, args) -> dict:
    """The library's jitted fine-tuning step for ``mode``: compile time, then the timed steps."""
    import jax
    import jax.numpy as jnp

    from jaxgpt import classify, lora
    from jaxgpt.config import get_config
    from jaxgpt.model import init_params

    cfg = get_config(args.preset, drop_rate=0.0, qkv_bias=True)  # chapter 6's BASE_CONFIG
    key = jax.random.PRNGKey(0)
    params = classify.add_classification_head(init_params(cfg, key), cfg, NUM_CLASSES, key)
    tx = classify.make_classifier_optimizer(5e-5, 0.1)
    if mode == "lora":
        adapters = lora.init_lora(params, args.lora_rank, jax.random.PRNGKey(1))
        state = lora.create_lora_state(params, tx, adapters, args.lora_alpha)
        step_fn = lora.jit_lora_train_step(cfg, tx, state.lora_alpha)
        source = "jaxgpt.lora.lora_train_step"
    else:
        state = classify.create_classifier_state(params, cfg, tx, mode)
        step_fn = classify.jit_classifier_train_step(cfg, tx)
        source = "jaxgpt.classify.classifier_train_step"
    trainable = sum(int(x.size) for x in jax.tree.leaves(state.trainable))
    batches = [
        (jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32))
        for x, y in _batches(cfg.vocab_size, args.batch_size, args.max_length)
    ]
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    box = [state]

    def step(batch):
        box[0], metrics = compiled(box[0], batch)
        return jax.block_until_ready(metrics["loss"])

    result = _timed(step, batches, args.steps, args.warmup)
    result.update(compile_s=compile_s, trainable_params=trainable, step_source=source)
    result["examples_per_s"] = args.batch_size / (result["step_ms"] / 1000)
    return result


# --------------------------------------------------------------------------- the book's code


def book_finetune(
    mode: str,
    preset: str,
    batch_size: int,
    max_length: int,
    steps: int,
    warmup: int,
    threads: int,
    rank: int,
    alpha: float,
) -> dict:
    """The book's chapter 6 step (in a child process): its ``GPTModel`` frozen as 6.5 or appendix E
    freeze it, ``AdamW(lr=5e-5, weight_decay=0.1)``, and the body of ``train_classifier_simple``."""
    import torch
    from llms_from_scratch import appendix_e, ch04, ch06

    from jaxgpt.config import get_config

    torch.manual_seed(123)
    torch.set_num_threads(threads)
    cfg = get_config(preset)
    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    model = ch04.GPTModel({**{k: getattr(cfg, k) for k in keys}, "drop_rate": 0.0, "qkv_bias": True})
    for param in model.parameters():
        param.requires_grad = False
    model.out_head = torch.nn.Linear(in_features=cfg.emb_dim, out_features=NUM_CLASSES)
    if mode == "lora":
        for param in model.parameters():
            param.requires_grad = False
        appendix_e.replace_linear_with_lora(model, rank=rank, alpha=alpha)
    else:
        for param in model.trf_blocks[-1].parameters():
            param.requires_grad = True
        for param in model.final_norm.parameters():
            param.requires_grad = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    model.train()
    batches = [
        (torch.from_numpy(x), torch.from_numpy(y))
        for x, y in _batches(cfg.vocab_size, batch_size, max_length)
    ]

    def step(batch):  # train_classifier_simple's inner loop
        input_batch, target_batch = batch
        optimizer.zero_grad()
        loss = ch06.calc_loss_batch(input_batch, target_batch, model, "cpu")
        loss.backward()
        optimizer.step()
        return loss.item()

    result = _timed(step, batches, steps, warmup)
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["examples_per_s"] = batch_size / (result["step_ms"] / 1000)
    result["threads"] = torch.get_num_threads()
    return result


def _run_book(name: str, mode: str, env: dict[str, str], args) -> dict:
    spec = {
        "mode": mode,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.ref_steps,
        "warmup": 1,
        "threads": args.threads,
        "rank": args.lora_rank,
        "alpha": args.lora_alpha,
    }
    return benchlib.run_reference(name, str(Path(__file__).resolve()), "_book_finetune", spec, env)


def _book_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "llms_from_scratch"))


def _reference_envs() -> list[tuple[str, dict[str, str]]]:
    """(name, environment) of each way the book's code runs: as a reader runs it, and under the
    launcher's allocator settings when those differ."""
    from jaxgpt.launch import allocator_env

    plain = benchlib.plain_env()
    envs = [("book", plain)]
    fast = allocator_env(plain)
    if fast != plain:
        envs.append(("book+allocator", fast))
    return envs


# --------------------------------------------------------------------------- the run


def build_parser() -> benchlib.OneLineParser:
    p = benchlib.OneLineParser(
        prog=PROG,
        description=__doc__.split("\n\n")[2].strip(),
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="gpt2-small", help="model preset (default gpt2-small)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of last-block, lora (default: both)")
    benchlib.add_int_flags(
        p,
        [
            ("--batch-size", 8, "texts per step (default 8, the book's)"),
            ("--max-length", 120, "padded tokens per text (default 120, the book's spam data)"),
            ("--steps", 4, "timed jaxgpt steps; the median is reported (default 4)"),
            ("--ref-steps", 3, "timed steps of the book's code (default 3)"),
            ("--lora-rank", 16, "LoRA rank (default 16, the book's)"),
            ("--threads", None, "PyTorch threads (default: the cores JAX uses)"),
        ],
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed jaxgpt steps after compiling (default 2)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale (default 16, the book's)")
    p.add_argument(
        "--references", default="book", choices=["book", "none"], help="run the book's code (default book)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def parse_args(argv: list[str] | None = None):
    """The options, checked: exit 2 with one line naming the flag before any work."""
    args = build_parser().parse_args(argv)

    def fail(message: str) -> NoReturn:
        benchlib.bad_input(PROG, message)

    modes = args.modes.split(",")
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        fail(f"--modes must be a comma list of {', '.join(MODES)}; got {args.modes!r}")
    args.modes = modes
    if args.warmup < 0:
        fail(f"--warmup must be 0 or more, got {args.warmup}")
    if not (args.lora_alpha > 0 and args.lora_alpha < float("inf")):
        fail(f"--lora-alpha must be a positive finite number, got {args.lora_alpha}")
    from jaxgpt.config import get_config

    try:
        cfg = get_config(args.preset)
    except ValueError as err:
        fail(f"--preset: {err}")
    if args.max_length > cfg.context_length:
        fail(f"--max-length {args.max_length} is longer than {args.preset}'s context of {cfg.context_length}")
    return args


def _print_row(name: str, r: dict, ratio: float | None = None) -> None:
    if "error" in r:
        print(f"  {name:<16} skipped ({r['error']})")
        return
    line = (
        f"  {name:<16} {r['examples_per_s']:7.2f} examples/s  step {r['step_ms']:7.0f} ms  "
        f"CPU s/step {r['cpu_s_per_step']:5.1f}  trainable {r['trainable_params']:,}"
    )
    if "compile_s" in r:
        line += f"  compile {r['compile_s']:.1f} s"
    if ratio is not None:
        line += f"   jaxgpt ratio {ratio:.2f}x"
    print(line, flush=True)


def run(args) -> int:
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    result = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "load_avg_1m_before": _load(),
        "modes": {},
    }
    if not args.json:
        print(
            f"fine-tuning step: {args.preset}, B={args.batch_size}, T={args.max_length}, "
            f"{NUM_CLASSES} classes, AdamW 5e-5, dropout off; on {result['machine']}",
            flush=True,
        )
    envs = []
    if args.references == "book":
        if _book_available():
            envs = _reference_envs()
        else:
            result["references_error"] = "the book's code is not installed (pip install -e '.[reference]')"
    for mode in args.modes:
        if not args.json:
            print(mode, flush=True)
        mine = bench_jaxgpt(mode, args)
        if not args.json:
            _print_row("jaxgpt", mine)
        refs = {}
        for name, env in envs:
            ref = _run_book(name, mode, env, args)
            ref.pop("name")
            if "examples_per_s" in ref:
                ref["ratio"] = mine["examples_per_s"] / ref["examples_per_s"]
            refs[name] = ref
            if not args.json:
                _print_row(name, ref, ref.get("ratio"))
        mine["references"] = refs
        result["modes"][mode] = mine
    result["load_avg_1m_after"] = _load()
    if args.json:
        print(json.dumps(result))
    else:
        if "references_error" in result:
            print(f"  references skipped: {result['references_error']}")
        print(
            f"load average (1 min) {result['load_avg_1m_before']:.2f} before, "
            f"{result['load_avg_1m_after']:.2f} after"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_book_finetune"]:  # internal: the book's step in a child process
        print(json.dumps(book_finetune(**json.loads(argv[1]))))
        return 0
    args = parse_args(argv)
    from jaxgpt.launch import relaunch_with_fast_allocator

    relaunch_with_fast_allocator()
    return run(args)


if __name__ == "__main__":
    benchlib.run_cli("bench_finetune.py", main)
