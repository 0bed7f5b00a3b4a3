"""Scale-out benchmark (not a test): sharded train steps, and streaming a corpus larger than memory.

    python scripts/bench_scale.py mesh --cpu-devices 8                 # simulated CPU devices
    python scripts/bench_scale.py mesh --meshes data=8,fsdp=8          # on the real devices present
    python scripts/bench_scale.py stream --gb 1.0 --steps 300          # >= 1 GB of tokens, RSS flat?

``mesh`` times the same global batch on one device and on each mesh, printing tokens/s per
device and the step's communication share. The share compares each mesh's step with a
"no collectives" step: ``shard_map`` runs the same per-device work (its rows of the batch, full
params) on every device with nothing exchanged, so ``share = 1 - t_local / t_mesh``. On
simulated CPU devices all "devices" share the host's cores, so read those figures as a check
that the machinery works, not as a prediction for real accelerators.

``stream`` writes a generated corpus of random token ids as prepared shards (``--gb`` of uint16
data), opens it with checksums, and trains a small model by streaming shuffled windows from it,
printing the process's resident memory (RSS) at the start and after every ``--report`` steps,
and the peak.

Kept apart from ``scripts/bench.py`` (owned by the speed work) because ``mesh`` must set the
simulated device count before JAX is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import OneLineParser, positive_int  # noqa: E402


def _positive_gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="bench_scale.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mesh", help="sharded train steps: tokens/s per device and communication share")
    m.add_argument(
        "--cpu-devices", type=int, default=0, help="simulate this many CPU devices (0: real devices)"
    )
    m.add_argument("--meshes", default="data=-1;fsdp=-1;data=2,fsdp=-1", help="';'-separated mesh specs")
    m.add_argument("--preset", default="quickstart")
    m.add_argument("--emb-dim", type=positive_int, default=None)
    m.add_argument("--n-layers", type=positive_int, default=None)
    m.add_argument("--context-length", type=positive_int, default=None)
    m.add_argument("--batch-size", type=positive_int, default=16, help="global batch (windows per step)")
    m.add_argument(
        "--steps", type=positive_int, default=5, help="timed steps per variant (after one warm-up step)"
    )
    m.add_argument("--dtype", default="float32")
    s = sub.add_parser("stream", help="train while streaming a generated corpus; report RSS")
    s.add_argument(
        "--gb", type=_positive_gb, default=1.0, help="size of the generated corpus in GB of uint16 tokens"
    )
    s.add_argument("--dir", default="/tmp/jaxgpt_bench_stream", help="where the shards are written (reused)")
    s.add_argument("--steps", type=positive_int, default=300)
    s.add_argument("--report", type=positive_int, default=100, help="print RSS every this many steps")
    s.add_argument("--batch-size", type=positive_int, default=8)
    s.add_argument("--context-length", type=positive_int, default=128)
    args = parser.parse_args(argv)
    if getattr(args, "cpu_devices", 0) < 0:
        parser.error(f"argument --cpu-devices: must be 0 or more, got {args.cpu_devices}")
    return args


def _config(args: argparse.Namespace):
    from jaxgpt import get_config

    overrides = {"drop_rate": 0.0, "dtype": args.dtype}
    for name in ("emb_dim", "n_layers", "context_length"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return get_config(args.preset, **overrides)


def _time_steps(step, state, batch, steps: int) -> tuple[float, object]:
    state, metrics = step(state, batch)  # compile + warm-up
    metrics["loss"].block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    metrics["loss"].block_until_ready()
    return (time.perf_counter() - start) / steps, state


def bench_mesh(args: argparse.Namespace) -> None:
    import functools

    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from jaxgpt import sharding
    from jaxgpt.train import TrainConfig, create_train_state, jit_train_step, train_step

    cfg = _config(args)
    tcfg = TrainConfig(batch_size=args.batch_size, seed=0)
    B, T = args.batch_size, cfg.context_length
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
    batch_np = (tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32))
    n = jax.device_count()
    dev = jax.devices()[0]
    print(
        f"devices: {n} x {dev.platform} ({dev.device_kind}); model {args.preset} emb_dim={cfg.emb_dim} "
        f"n_layers={cfg.n_layers} T={T} vocab={cfg.vocab_size}; global batch {B} ({B * T} tokens/step)"
    )
    print(f"{'variant':<24}{'step ms':>10}{'tokens/s':>12}{'tok/s/device':>14}{'comm share':>12}")

    def new_state():
        return create_train_state(cfg, tcfg, jax.random.PRNGKey(0), total_steps=1000)

    # one device: today's jitted step
    state, tx = new_state()
    t_single, _ = _time_steps(
        jit_train_step(cfg, tx), state, tuple(map(jax.numpy.asarray, batch_np)), args.steps
    )
    rate = B * T / t_single
    print(f"{'one device':<24}{t_single * 1e3:>10.1f}{rate:>12.0f}{rate:>14.0f}{'-':>12}")
    del state

    step_fn = functools.partial(train_step, cfg=cfg, tx=tx)
    local_time: float | None = None
    for spec in args.meshes.split(";"):
        mesh = sharding.make_mesh(spec)
        if local_time is None:  # the no-collectives reference: same per-device work, nothing exchanged
            batch_spec = P(sharding.BATCH_AXES)
            local = jax.jit(
                jax.shard_map(
                    step_fn, mesh=mesh, in_specs=(P(), batch_spec), out_specs=(P(), P()), check_vma=False
                ),
                donate_argnums=0,
            )
            state = jax.device_put(new_state()[0], sharding.replicated(mesh))
            local_time, _ = _time_steps(local, state, sharding.shard_batch(batch_np, mesh), args.steps)
            del state
            print(
                f"{'no collectives (local)':<24}{local_time * 1e3:>10.1f}{B * T / local_time:>12.0f}"
                f"{B * T / local_time / n:>14.0f}{'0%':>12}"
            )
        state, shardings = sharding.init_sharded(lambda: new_state()[0], mesh)
        step = sharding.shard_train_step(step_fn, mesh, shardings)
        t, _ = _time_steps(step, state, sharding.shard_batch(batch_np, mesh), args.steps)
        del state
        share = max(0.0, 1.0 - local_time / t)
        name = ",".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "data=1"
        print(f"{name:<24}{t * 1e3:>10.1f}{B * T / t:>12.0f}{B * T / t / n:>14.0f}{share:>11.0%}")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_stream(args: argparse.Namespace) -> None:
    import numpy as np

    from jaxgpt.shards import ShardError, ShardLoader, ShardWindows, open_shards, write_token_shards
    from jaxgpt.tokenizer import N_VOCAB

    print(f"RSS at start: {_rss_mb():.0f} MB")
    n_tokens = int(args.gb * 1e9) // 2
    per_shard = 16 * 2**20  # 32 MiB shards
    directory = Path(args.dir)
    try:  # the corpus of an earlier run, when it has the size asked for
        reuse = open_shards(directory, verify=False).manifest["total_tokens"] == n_tokens
    except ShardError:
        reuse = False
    if not reuse:
        if directory.exists():
            import shutil

            shutil.rmtree(directory)
        t0 = time.perf_counter()

        def generated():
            rng = np.random.default_rng(0)
            for start in range(0, n_tokens, per_shard):
                yield rng.integers(0, N_VOCAB, size=min(per_shard, n_tokens - start), dtype=np.uint16)

        write_token_shards(generated(), directory, description=f"bench_scale random ids, {n_tokens} tokens")
        print(f"wrote {n_tokens:,} tokens ({2 * n_tokens / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    tokens = open_shards(directory)  # with checksums: reads every byte once
    print(
        f"opened {len(tokens):,} tokens in {len(tokens.manifest['shards'])} shards, checksums verified in "
        f"{time.perf_counter() - t0:.1f} s; RSS {_rss_mb():.0f} MB"
    )

    import jax

    from jaxgpt import get_config
    from jaxgpt.train import TrainConfig, create_train_state, jit_train_step

    cfg = get_config("quickstart", context_length=args.context_length, emb_dim=64, n_heads=2, n_layers=2)
    tcfg = TrainConfig(batch_size=args.batch_size)
    loader = ShardLoader(
        ShardWindows(tokens, cfg.context_length, cfg.context_length), args.batch_size, seed=0
    )
    state, tx = create_train_state(cfg, tcfg, jax.random.PRNGKey(0), total_steps=args.steps)
    step = jit_train_step(cfg, tx)
    print(f"{loader.num_windows:,} windows of {cfg.context_length} tokens, shuffled; batch {args.batch_size}")
    t0 = time.perf_counter()
    batches = loader.iter_epoch(0)
    first_rss = None
    for i in range(1, args.steps + 1):
        x, y = next(batches)
        state, metrics = step(state, (jax.numpy.asarray(x), jax.numpy.asarray(y)))
        if i == 1:
            metrics["loss"].block_until_ready()
            first_rss = _rss_mb()
            print(f"step 1 (compiled): RSS {first_rss:.0f} MB")
            t0 = time.perf_counter()
        elif i % args.report == 0 or i == args.steps:
            loss = float(metrics["loss"])
            rate = (i - 1) * args.batch_size * cfg.context_length / (time.perf_counter() - t0)
            print(
                f"step {i}: loss {loss:.3f}, RSS {_rss_mb():.0f} MB "
                f"(+{_rss_mb() - first_rss:.1f} since step 1), {rate:,.0f} tokens/s"
            )
    print(f"peak RSS {_peak_rss_mb():.0f} MB for a {2 * len(tokens) / 1e9:.2f} GB corpus")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "mesh" and args.cpu_devices:
        if "jax" in sys.modules:
            raise RuntimeError("--cpu-devices must be set before JAX is imported")
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    {"mesh": bench_mesh, "stream": bench_stream}[args.command](args)


if __name__ == "__main__":
    main()
