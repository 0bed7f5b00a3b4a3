"""Pretrain a GPT on text (book chapter 5): ``python scripts/train.py`` trains the quickstart preset.

Everything here is wiring: options -> jaxgpt.train (loop, loss, optimizer) and
jaxgpt.checkpoint (orbax). The output directory gets

  config.json     model and training options, data paths and a fingerprint of the tokens
  metrics.jsonl   one JSON object per evaluation (step, epoch, tokens_seen, train/val loss, lr)
  loss.png        training and validation loss against tokens seen (the book's figure 5.12)
  checkpoints/    orbax checkpoints: every --save-every steps, at the end and on Ctrl-C

Exit codes: 0 done, 1 non-finite loss, 2 bad input (nothing trained), 130 interrupted by
Ctrl-C after saving a checkpoint (continue with --resume).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxgpt import sharding  # noqa: E402
from jaxgpt.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointManager,
    restore_checkpoint,
    save_checkpoint,
)
from jaxgpt.config import PRESETS, backend_defaults, get_config  # noqa: E402
from jaxgpt.data import Data, DataError, default_corpus, load_corpus, prepare_data  # noqa: E402
from jaxgpt.model import count_params  # noqa: E402
from jaxgpt.plot import plot_losses  # noqa: E402
from jaxgpt.shards import is_shard_dir, shard_loaders  # noqa: E402
from jaxgpt.train import (  # noqa: E402
    Hooks,
    NonFiniteLossError,
    Position,
    TrainConfig,
    create_train_state,
    default_train_config,
    make_optimizer,
    total_train_steps,
    train,
)

# CLI flag -> TrainConfig field; the default of each comes from the preset (TRAIN_PRESETS).
TRAIN_FLAGS = {
    "batch_size": "batch_size",
    "stride": "stride",
    "epochs": "num_epochs",
    "max_steps": "max_steps",
    "lr": "learning_rate",
    "min_lr": "min_lr",
    "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps",
    "grad_clip": "grad_clip",
    "grad_accum": "grad_accum",
    "eval_freq": "eval_freq",
    "eval_iter": "eval_iter",
    "seed": "seed",
    "sample_tokens": "sample_tokens",
}
RUN_FLAGS = ("preset", "data", "context_length", "dtype", "remat", "set", "save_every", "keep", "out")


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    qs = default_train_config("quickstart")
    book = TrainConfig()
    p = argparse.ArgumentParser(
        description="Pretrain a GPT model on plain text (the book's chapter 5), with evaluation, samples, "
        "a loss plot and resumable checkpoints. Defaults marked 'preset' come from the preset: "
        f"quickstart uses lr {qs.learning_rate}, {qs.warmup_steps} warmup steps, batch {qs.batch_size}, "
        f"{qs.num_epochs} epochs, eval every {qs.eval_freq} steps; other presets the book's lr "
        f"{book.learning_rate}, batch {book.batch_size}, {book.num_epochs} epochs, "
        f"eval every {book.eval_freq}.",
        epilog="Exit codes: 0 finished, 1 non-finite loss, 2 bad input (before training), "
        "130 interrupted by Ctrl-C (a checkpoint was saved; continue with --resume OUT). "
        "Compiled steps are kept in JAX's persistent cache (~/.cache/jaxgpt/xla, or "
        "$JAX_COMPILATION_CACHE_DIR), so a second run of the same shapes starts without compiling; "
        "JAXGPT_NO_COMPILE_CACHE=1 turns it off.",
    )
    a = p.add_argument
    a("--preset", default="quickstart", choices=sorted(PRESETS), help="model size (default: %(default)s)")
    a(
        "--data",
        nargs="+",
        metavar="PATH",
        help="UTF-8 text file(s) and/or directories of .txt files (default: jaxgpt's built-in corpus, "
        "the Python help topics, ~139k tokens)",
    )
    a(
        "--context-length",
        type=int,
        help="tokens per training window, at most the preset's context "
        "length; the model's positional embedding is sized to it (default: the preset's)",
    )
    a("--batch-size", type=int, help="windows per (micro)batch (default: preset)")
    a("--stride", type=int, help="distance between window starts (default: the context length, no overlap)")
    a("--epochs", type=int, help="passes over the training split (default: preset)")
    a("--max-steps", type=int, help="stop after this many optimizer steps; overrides --epochs")
    a("--lr", type=float, help="peak learning rate of AdamW (default: preset)")
    a("--min-lr", type=float, help="decay the learning rate along a cosine to this value (default: constant)")
    a("--weight-decay", type=float, help=f"AdamW weight decay (default: {book.weight_decay})")
    a("--warmup-steps", type=int, help="linear warmup steps from 0 to --lr (default: preset)")
    a("--grad-clip", type=float, help="clip gradients to this global L2 norm (default: off)")
    a("--grad-accum", type=int, help="microbatches averaged per optimizer step (default: 1)")
    a(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="compute dtype of the matmuls; params and AdamW state stay float32 (default: float32 on a "
        "CPU, as in the book; bfloat16 on a GPU or TPU, with --set activation_dtype=bfloat16 and, on a "
        "GPU, the blocks unrolled: see jaxgpt.config.backend_defaults). On a CPU, bfloat16 runs "
        "fastest with --remat dots",
    )
    a(
        "--remat",
        choices=["none", "full", "dots"],
        help="recompute in the backward pass instead of storing: none; full (each block, least memory: "
        "gpt2-small at context 1024); dots (keep matmul outputs, recompute the elementwise work) "
        "(default: none)",
    )
    a("--eval-freq", type=int, help="evaluate after step 1 and every this many steps (default: preset)")
    a("--eval-iter", type=int, help="batches per split in each evaluation (default: preset)")
    a(
        "--sample-tokens",
        type=int,
        help="tokens of the greedy sample of 'Every effort moves you' each epoch; 0: none (default 50)",
    )
    a("--seed", type=int, help=f"seed of init, dropout and data order (default: {book.seed})")
    a(
        "--save-every",
        type=int,
        default=100,
        help="save a checkpoint every this many steps; 0: only at the end (default: %(default)s)",
    )
    a("--keep", type=int, default=2, help="checkpoints to keep, the latest ones (default: %(default)s)")
    a("--out", help="output directory (default: runs/<preset>-<date>-<time>)")
    a(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with its saved options and data "
        "(give no other options)",
    )
    a(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a GPTConfig field of the preset, e.g. --set n_layers=6 --set drop_rate=0 (repeatable)",
    )
    a(
        "--mesh",
        help="device mesh, e.g. data=8 or data=2,fsdp=4 (axes data, fsdp, tensor; -1 = the rest). "
        "Default: every device on data; one device runs unsharded. Allowed with --resume. "
        "--data may also be a directory prepared by scripts/prepare.py (streamed, not loaded)",
    )
    return p


def _make_mesh(args: argparse.Namespace) -> Any:
    """The device mesh of ``--mesh`` (scale-out, see jaxgpt/sharding.py), or None on one device."""
    if args.mesh is None and jax.device_count() == 1:
        return None  # exactly the single-device path
    try:
        return sharding.make_mesh(args.mesh)
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from e


def _load_data(paths: list[str] | None, context_length: int, tcfg: TrainConfig) -> Data:
    """Text files are tokenized in memory; one directory from scripts/prepare.py is streamed."""
    if paths is None or len(paths) != 1 or not is_shard_dir(paths[0]):
        text = default_corpus() if paths is None else load_corpus(paths)
        return prepare_data(text, context_length, tcfg)
    stride = context_length if tcfg.stride is None else tcfg.stride
    train_loader, val_loader = shard_loaders(
        paths[0],
        tcfg.batch_size,
        context_length,
        stride,
        tcfg.train_ratio,
        tcfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )  # each process reads only its rows of every batch
    if len(train_loader) < tcfg.grad_accum or len(val_loader) == 0:
        raise DataError(
            f"{paths[0]} is too small: {len(train_loader)} training and {len(val_loader)} validation "
            f"batches of {tcfg.batch_size} x {context_length} tokens; a step needs {tcfg.grad_accum}"
        )
    windows = train_loader.windows
    return Data(
        train_loader,
        val_loader,
        train_tokens=windows.stop,
        val_tokens=len(windows.tokens) - windows.stop,
        fingerprint=windows.tokens.manifest["dataset_id"],
    )


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[field] = json.loads(value)
        except json.JSONDecodeError:
            out[field] = value
    return out


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output directory {out} cannot be written: {e.strerror or e}") from e


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Everything before the first step: options, data, state. Raises on bad input."""
    if args.resume:
        given = [
            f
            for f in (*TRAIN_FLAGS, *RUN_FLAGS)
            if f not in ("preset", "save_every", "keep", "set") and getattr(args, f) is not None
        ]
        given += ["set"] if args.set else []
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise UsageError(f"--resume continues with the run's saved options; drop {flags}")
        out = Path(args.resume)
        if not (out / "config.json").is_file():
            raise CheckpointError(f"cannot resume: {out} is not a run directory (it has no config.json)")
        run_cfg = json.loads((out / "config.json").read_text())
        _check_out_dir(out)
        mngr = CheckpointManager(out, keep=run_cfg["keep"])
        mesh = _make_mesh(args)
        state, tx, cfg, tcfg, pos, _ = restore_checkpoint(mngr, mesh=mesh)
        paths = run_cfg["data"]["paths"]
        data = _load_data(paths, cfg.context_length, tcfg)
        if data.fingerprint != run_cfg["data"]["fingerprint"]:
            raise DataError(f"the data of {out} changed since the run started (token fingerprint differs)")
        return dict(
            out=out,
            mngr=mngr,
            state=state,
            tx=tx,
            cfg=cfg,
            tcfg=tcfg,
            pos=pos,
            data=data,
            run_cfg=run_cfg,
            save_every=run_cfg["save_every"],
            resumed=True,
            mesh=mesh,
        )

    if args.save_every < 0 or args.keep < 1:
        raise UsageError(f"--save-every must be >= 0 and --keep >= 1, got {args.save_every} and {args.keep}")
    preset_cfg = get_config(args.preset)
    overrides = _parse_overrides(args.set)
    if args.dtype is not None:
        overrides["dtype"] = args.dtype
    n_layers = overrides.get("n_layers", preset_cfg.n_layers)
    defaults = backend_defaults(jax.default_backend(), n_layers)
    if overrides.get("dtype") == "float32":  # float32 asked for: no bf16 activations either
        defaults.pop("activation_dtype", None)
    overrides = {**defaults, **overrides}
    if args.remat is not None:
        overrides["remat"] = args.remat
    if args.context_length is not None:
        if not 0 < args.context_length <= preset_cfg.context_length:
            raise UsageError(
                f"--context-length {args.context_length} does not fit preset {args.preset!r}: "
                f"it must be between 1 and its context length {preset_cfg.context_length}"
            )
        overrides["context_length"] = args.context_length
    try:
        cfg = preset_cfg.replace(**overrides)
    except TypeError as e:
        raise UsageError(f"--set names an unknown GPTConfig field: {e}") from e
    changes = {
        field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag) is not None
    }
    tcfg = default_train_config(args.preset).replace(**changes)

    out = (
        Path(args.out)
        if args.out
        else Path("runs") / f"{args.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise UsageError(
            f"{out} already holds a run's checkpoints; continue it with --resume {out}, "
            "or choose another --out"
        )
    mesh = _make_mesh(args)
    data = _load_data(args.data, cfg.context_length, tcfg)
    _check_out_dir(out)

    total = total_train_steps(data.train_loader, tcfg)
    if mesh is None:
        state, tx = create_train_state(cfg, tcfg, jax.random.PRNGKey(tcfg.seed), total)
    else:  # each device initialises only its shards
        new = lambda: create_train_state(cfg, tcfg, jax.random.PRNGKey(tcfg.seed), total)[0]  # noqa: E731
        state, tx = sharding.init_sharded(new, mesh)[0], make_optimizer(tcfg, total)
    run_cfg = {
        "preset": args.preset,
        "model_config": cfg.to_dict(),
        "train_config": tcfg.to_dict(),
        "data": {
            "paths": None if args.data is None else [str(Path(d).resolve()) for d in args.data],
            "train_tokens": data.train_tokens,
            "val_tokens": data.val_tokens,
            "fingerprint": data.fingerprint,
        },
        "total_steps": total,
        "save_every": args.save_every,
        "keep": args.keep,
        "num_params": count_params(state.params),
    }
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps(run_cfg, indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")
    mngr = CheckpointManager(out, keep=args.keep)
    return dict(
        out=out,
        mngr=mngr,
        state=state,
        tx=tx,
        cfg=cfg,
        tcfg=tcfg,
        pos=Position(),
        data=data,
        run_cfg=run_cfg,
        save_every=args.save_every,
        resumed=False,
        mesh=mesh,
    )


class CLIHooks(Hooks):
    """Progress bar, printed evaluations and samples, metrics.jsonl, checkpoints and Ctrl-C."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.run, self.main = run, jax.process_index() == 0
        self.metrics_path = run["out"] / "metrics.jsonl"
        self.interrupted = False
        self.saved: str | None = None
        self.bar: tqdm | None = None
        self.t0 = time.perf_counter()
        self.tokens0 = 0

    def _print(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def on_start(self, state, pos, total_steps):  # noqa: ANN001
        step = int(state.step)
        self.tokens0, self.t0 = pos.tokens_seen, time.perf_counter()
        self.bar = tqdm(
            total=total_steps,
            initial=step,
            desc="train",
            unit="step",
            disable=not self.main,
            dynamic_ncols=True,
        )

    def on_step(self, step, metrics, pos):  # noqa: ANN001
        if self.bar is not None:
            rate = (pos.tokens_seen - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(step=step, loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:.0f}")

    def on_eval(self, record):  # noqa: ANN001
        record = {**record, "elapsed_s": round(time.perf_counter() - self.t0, 2)}
        self._print(
            f"Ep {max(1, math.ceil(record['epoch']))} (Step {record['step']:06d}): "
            f"Train loss {record['train_loss']:.3f}, Val loss {record['val_loss']:.3f}, "
            f"tokens seen {record['tokens_seen']}"
        )
        if self.main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_epoch_end(self, epoch, sample):  # noqa: ANN001
        self._print(f"Ep {epoch + 1} sample: {sample}")

    def should_save(self, step):  # noqa: ANN001
        return self.run["save_every"] > 0 and step % self.run["save_every"] == 0

    def save(self, state, pos, final):  # noqa: ANN001
        r = self.run
        path = save_checkpoint(r["mngr"], state, r["cfg"], r["tcfg"], pos, r["run_cfg"]["total_steps"])
        self.saved = path
        if not final:
            self._print(f"saved checkpoint {path}")

    def should_stop(self, step):  # noqa: ANN001
        return self.interrupted

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _records(path: Path, upto: int) -> list[dict[str, Any]]:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sharding.maybe_initialize_distributed()  # multi-host launchers: join before any JAX call
    try:
        run = setup(args)
    except (UsageError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    hooks = CLIHooks(run)

    def on_sigint(signum, frame):  # noqa: ANN001
        hooks.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        hooks._print("Ctrl-C: saving a checkpoint after this step (press again to abort without saving)")

    # Installed before the first line is printed: from then on Ctrl-C saves and exits cleanly.
    old_handler = signal.signal(signal.SIGINT, on_sigint)
    out, cfg, tcfg, main_proc = run["out"], run["cfg"], run["tcfg"], jax.process_index() == 0
    start_step = int(run["state"].step)
    history = _records(out / "metrics.jsonl", start_step)
    if main_proc:
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        d = run["data"]
        verb = f"Resuming at step {start_step}" if run["resumed"] else "Training"
        print(
            f"{verb}: {run['run_cfg']['num_params']:,} parameters, {d.train_tokens:,} train / "
            f"{d.val_tokens:,} validation tokens, {run['run_cfg']['total_steps']} steps "
            f"of {tcfg.grad_accum * tcfg.batch_size} x {cfg.context_length} tokens -> {out}",
            flush=True,
        )

    t0 = time.perf_counter()
    try:
        state, pos, records = train(
            run["state"],
            run["tx"],
            cfg,
            tcfg,
            run["data"].train_loader,
            run["data"].val_loader,
            run["pos"],
            hooks,
            mesh=run["mesh"],
        )
    except NonFiniteLossError as e:
        hooks.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, old_handler)
        hooks.close()
    elapsed = time.perf_counter() - t0

    history += records
    if main_proc and history:
        plot_losses(history, out / "loss.png")
    step = int(state.step)
    if hooks.interrupted and step < run["run_cfg"]["total_steps"]:
        print(
            f"Interrupted at step {step}: saved checkpoint {hooks.saved}.\n"
            f"Resume with: python scripts/train.py --resume {out}",
            flush=True,
        )
        return 130
    last = history[-1] if history else {}
    if main_proc:
        print(
            f"Done: {step} steps in {elapsed / 60:.1f} min; "
            f"train loss {last.get('train_loss', float('nan')):.3f}, "
            f"val loss {last.get('val_loss', float('nan')):.3f}; checkpoint {hooks.saved}, "
            f"plot {out / 'loss.png'}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    try:  # re-run once with the allocator that makes CPU steps faster (see jaxgpt/launch.py)
        from jaxgpt.launch import relaunch_with_fast_allocator
    except ImportError:
        pass
    else:
        relaunch_with_fast_allocator()
        from jaxgpt.xla import enable_compilation_cache

        enable_compilation_cache()  # a second run of the same shapes skips the compile
    sys.exit(main())
