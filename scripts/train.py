"""Pretrain a GPT on text (book chapter 5): ``python scripts/train.py`` trains the quickstart preset.

Everything here is wiring: options -> jaxgpt.data (corpus), jaxgpt.train (loop, loss, optimizer)
and jaxgpt.checkpoint (orbax). The output directory gets

  config.json     model and training options, data paths and a fingerprint of the tokens
  metrics.jsonl   one JSON object per evaluation (step, epoch, tokens_seen, train/val loss, lr)
  loss.png        training and validation loss against tokens seen (the book's figure 5.12)
  checkpoints/    orbax checkpoints: every --save-every steps, at the end and on Ctrl-C

Exit codes: see EXIT_CODES (also printed by --help).
"""

import signal
import sys

import runlib  # scripts/ is on sys.path when a script runs
from runlib import CtrlC, Interrupted, UsageError

if __name__ == "__main__":  # from the first moment: importing JAX alone takes seconds
    signal.signal(signal.SIGINT, CtrlC.handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one pending since a re-execution

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxgpt  # noqa: E402
from jaxgpt import sharding  # noqa: E402
from jaxgpt.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointManager,
    restore_checkpoint,
    save_checkpoint,
)
from jaxgpt.config import PRESETS, GPTConfig, backend_defaults, get_config  # noqa: E402
from jaxgpt.data import Data, DataError, default_corpus, load_corpus, prepare_data  # noqa: E402
from jaxgpt.model import count_params, init_params  # noqa: E402
from jaxgpt.plot import plot_losses  # noqa: E402
from jaxgpt.shards import is_shard_dir, shard_loaders  # noqa: E402
from jaxgpt.train import (  # noqa: E402
    Hooks,
    NonFiniteLossError,
    Position,
    TrainConfig,
    TrainConfigError,
    TrainState,
    create_train_state,
    default_train_config,
    make_optimizer,
    total_train_steps,
    train,
)

EXIT_CODES = (
    "Exit codes: 0 finished (or the resumed run was already complete); 1 a failure during training "
    "(a non-finite loss or parameter; nothing non-finite is saved); 2 bad input, reported in one line "
    "before any work, nothing written; 130 interrupted by Ctrl-C: once training has begun a checkpoint "
    "is saved first (continue with --resume OUT), before that nothing is left behind."
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
    "sample_temperature": "sample_temperature",
    "sample_top_k": "sample_top_k",
}
FLAG_OF_FIELD = {field: "--" + flag.replace("_", "-") for flag, field in TRAIN_FLAGS.items()}
RUN_FLAGS = (
    "preset",
    "init_from",
    "data",
    "context_length",
    "dtype",
    "remat",
    "set",
    "save_every",
    "keep",
    "out",
)
SAVE_EVERY, KEEP = 100, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    qs = default_train_config("quickstart")
    book = TrainConfig()
    p = _Parser(
        description="Pretrain a GPT model on plain text (the book's chapter 5), with evaluation, samples, "
        "a loss plot and resumable checkpoints. Defaults marked 'preset' come from the preset: "
        f"quickstart uses lr {qs.learning_rate}, {qs.warmup_steps} warmup steps, batch {qs.batch_size}, "
        f"{qs.num_epochs} epochs, eval every {qs.eval_freq} steps, samples drawn at temperature "
        f"{qs.sample_temperature} from the top {qs.sample_top_k} tokens; other presets the book's lr "
        f"{book.learning_rate}, batch {book.batch_size}, {book.num_epochs} epochs, "
        f"eval every {book.eval_freq}, greedy samples.",
        epilog=f"{EXIT_CODES} Compiled steps are kept in JAX's persistent cache (~/.cache/jaxgpt/xla, or "
        "$JAX_COMPILATION_CACHE_DIR), so a second run of the same shapes starts without compiling; "
        "JAXGPT_NO_COMPILE_CACHE=1 turns it off.",
    )
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="model size (default: quickstart)")
    a(
        "--init-from",
        metavar="MODEL",
        help="continue pretraining from these weights instead of a preset's random ones: a GPT-2 name "
        "(gpt2, gpt2-medium, ...), the book's gpt2/124M download, a Hugging Face directory, a run or a "
        ".pth; the model's configuration comes from them, the training options default to the book's",
    )
    a(
        "--data",
        nargs="+",
        metavar="PATH",
        help="UTF-8 text file(s) and/or directories of .txt files, or one directory prepared by "
        "scripts/prepare.py (streamed, not loaded) (default: jaxgpt's built-in corpus, the Python help "
        "topics, ~139k tokens)",
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
        help=f"tokens of the sample continuing {book.start_context!r} after each epoch; 0: none "
        f"(default: {book.sample_tokens})",
    )
    a(
        "--sample-temperature",
        type=float,
        help="temperature of the epoch samples; 0: greedy (default: preset)",
    )
    a("--sample-top-k", type=int, help="draw the epoch samples from the k likeliest tokens (default: preset)")
    a("--seed", type=int, help=f"seed of init, dropout, data order and samples (default: {book.seed})")
    a(
        "--save-every",
        type=int,
        help=f"save a checkpoint every this many steps; 0: only at the end (default: {SAVE_EVERY})",
    )
    a("--keep", type=int, help=f"checkpoints to keep, the latest ones (default: {KEEP})")
    a(
        "--out",
        help="output directory, new or empty (default: runs/<preset>-<date>-<time>)",
    )
    a(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with its saved options and data "
        "(give no other options but --mesh)",
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
        "Default: every device on data; one device runs unsharded. Allowed with --resume",
    )
    return p


@dataclass
class RunSetup:
    """Everything a run needs before its first step, for a new run and a resumed one alike."""

    out: Path
    cfg: GPTConfig
    tcfg: TrainConfig
    state: TrainState
    tx: optax.GradientTransformation
    pos: Position
    data: Data
    mesh: jax.sharding.Mesh | None
    run_cfg: dict[str, Any]  # what config.json holds
    resumed: bool

    @property
    def total_steps(self) -> int:
        return self.run_cfg["total_steps"]


# --------------------------------------------------------------------------------------------
# Checks of the input (each raises UsageError, DataError or CheckpointError: exit 2)
# --------------------------------------------------------------------------------------------


def _make_mesh(spec: str | None) -> Any:
    """The device mesh of ``--mesh`` (scale-out, see jaxgpt/sharding.py), or None on one device."""
    if spec is None and jax.device_count() == 1:
        return None  # exactly the single-device path
    try:
        return sharding.make_mesh(spec)
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


def _read_run_config(out: Path) -> dict[str, Any]:
    """The config.json of run directory ``out``, checked to hold what a resume reads."""
    if not out.exists():
        raise UsageError(f"--resume {out} does not exist")
    path = out / "config.json"
    if not out.is_dir() or not path.is_file():
        raise UsageError(f"--resume {out} is not a run directory (it has no config.json)")
    try:
        run_cfg = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"{path} cannot be read: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from e
    expected = {"total_steps": int, "save_every": int, "keep": int, "num_params": int, "data": dict}
    kind_names = {int: "an integer", dict: "an object"}
    problems = []
    if not isinstance(run_cfg, dict):
        problems.append(f"it holds a {type(run_cfg).__name__}, not an object")
    else:
        for key, kind in expected.items():
            if not isinstance(run_cfg.get(key), kind) or isinstance(run_cfg.get(key), bool):
                problems.append(f"{key!r} is missing or not {kind_names[kind]}")
        data = run_cfg.get("data")
        if isinstance(data, dict):
            paths = data.get("paths")
            if not isinstance(data.get("fingerprint"), str):
                problems.append("'data.fingerprint' is missing or not a string")
            if paths is not None and not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
                problems.append("'data.paths' is neither null nor a list of paths")
    if not problems and (run_cfg["keep"] < 1 or run_cfg["save_every"] < 0 or run_cfg["total_steps"] < 1):
        problems.append("'keep', 'save_every' or 'total_steps' is out of range")
    if problems:
        raise UsageError(f"{path} is not a train.py run config: {'; '.join(problems)}")
    return run_cfg


def _train_config(preset: str, args: argparse.Namespace) -> TrainConfig:
    changes = {
        field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag) is not None
    }
    try:
        return default_train_config(preset).replace(**changes)
    except TrainConfigError as e:  # name the flag the user typed, not the field
        raise UsageError(f"{FLAG_OF_FIELD.get(e.field, e.field)} {e.problem}") from e


def _model_config(base: GPTConfig, args: argparse.Namespace, origin: str) -> GPTConfig:
    """``base`` (a preset's or loaded weights' config, named by ``origin``) with the flags applied."""
    overrides = _parse_overrides(args.set)
    if args.dtype is not None:
        overrides["dtype"] = args.dtype
    defaults = backend_defaults(jax.default_backend(), overrides.get("n_layers", base.n_layers))
    if overrides.get("dtype") == "float32":  # float32 asked for: no bf16 activations either
        defaults.pop("activation_dtype", None)
    overrides = {**defaults, **overrides}
    if args.remat is not None:
        overrides["remat"] = args.remat
    if args.context_length is not None:
        if not 0 < args.context_length <= base.context_length:
            raise UsageError(
                f"--context-length {args.context_length} does not fit {origin}: "
                f"it must be between 1 and its context length {base.context_length}"
            )
        overrides["context_length"] = args.context_length
    try:
        return base.replace(**overrides)
    except TypeError as e:
        raise UsageError(f"--set names an unknown GPTConfig field: {e}") from e
    except ValueError as e:
        raise UsageError(f"--set: {e}") from e


def _initial_params(args: argparse.Namespace) -> tuple[GPTConfig, Any, str]:
    """For --init-from: (config with the flags applied, the loaded params fitted to it, origin)."""
    if args.preset:
        raise UsageError("--init-from takes the model's configuration from its weights; drop --preset")
    origin = f"--init-from {args.init_from}"
    try:
        loaded_cfg, params = jaxgpt.load(args.init_from)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UsageError(f"{origin}: {e}") from e
    cfg = _model_config(loaded_cfg, args, origin)
    if cfg.context_length < loaded_cfg.context_length:  # keep the first positions, as nanoGPT's crop
        params = {**params, "pos_emb": {"embedding": params["pos_emb"]["embedding"][: cfg.context_length]}}
    expected = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or any(
        e.shape != g.shape for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True)
    ):
        raise UsageError(
            f"--set changes the shape of the model loaded by {origin}; only shape-free fields fit"
        )
    return cfg, params, origin


# --------------------------------------------------------------------------------------------
# Setup: a new run or a resumed one
# --------------------------------------------------------------------------------------------


def setup(args: argparse.Namespace) -> RunSetup | None:
    """Everything before the first step: options, data, state; None for a finished run.

    Raises on bad input and writes nothing: the run's files appear when training starts.
    """
    return _setup_resume(args) if args.resume else _setup_new(args)


def _setup_resume(args: argparse.Namespace) -> RunSetup | None:
    given = [f for f in (*TRAIN_FLAGS, *RUN_FLAGS) if getattr(args, f) not in (None, [])]
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise UsageError(f"--resume continues with the run's saved options; drop {flags}")
    out = Path(args.resume)
    run_cfg = _read_run_config(out)
    if not (out / "checkpoints").is_dir():
        raise CheckpointError(f"cannot resume: no checkpoint in {out / 'checkpoints'}")
    mngr = CheckpointManager(out, keep=run_cfg["keep"], read_only=True)
    if mngr.latest_step() is None:
        raise CheckpointError(f"cannot resume: no checkpoint in {mngr.root}")
    if mngr.latest_step() >= run_cfg["total_steps"]:
        return None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--resume {out} cannot be written")
    mesh = _make_mesh(args.mesh)
    state, tx, cfg, tcfg, pos, _ = restore_checkpoint(mngr, mesh=mesh)
    CtrlC.check()
    data = _load_data(run_cfg["data"]["paths"], cfg.context_length, tcfg)
    if data.fingerprint != run_cfg["data"]["fingerprint"]:
        raise DataError(f"the data of {out} changed since the run started (token fingerprint differs)")
    return RunSetup(out, cfg, tcfg, state, tx, pos, data, mesh, run_cfg, resumed=True)


def _setup_new(args: argparse.Namespace) -> RunSetup:
    save_every = SAVE_EVERY if args.save_every is None else args.save_every
    keep = KEEP if args.keep is None else args.keep
    if save_every < 0:
        raise UsageError(f"--save-every must be an integer >= 0, got {save_every}")
    if keep < 1:
        raise UsageError(f"--keep must be a positive integer, got {keep}")
    params, name = None, args.preset or "quickstart"
    if args.init_from:
        cfg, params, _ = _initial_params(args)
        tcfg, name = _train_config("book-124m", args), Path(args.init_from).name or "model"
    else:
        cfg, tcfg = _model_config(get_config(name), args, f"preset {name!r}"), _train_config(name, args)
    out = Path(args.out) if args.out else Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    runlib.check_new_out(out)
    mesh = _make_mesh(args.mesh)
    CtrlC.check()
    data = _load_data(args.data, cfg.context_length, tcfg)
    CtrlC.check()
    total = total_train_steps(data.train_loader, tcfg)
    if mesh is None:
        state, tx = create_train_state(cfg, tcfg, jax.random.PRNGKey(tcfg.seed), total, params)
    else:  # each device initialises only its shards
        new = lambda: create_train_state(cfg, tcfg, jax.random.PRNGKey(tcfg.seed), total, params)[0]  # noqa: E731
        state, tx = sharding.init_sharded(new, mesh)[0], make_optimizer(tcfg, total)
    run_cfg = {
        "preset": args.preset or (None if args.init_from else name),
        "init_from": args.init_from,
        "model_config": cfg.to_dict(),
        "train_config": tcfg.to_dict(),
        "data": {
            "paths": None if args.data is None else [str(Path(d).resolve()) for d in args.data],
            "train_tokens": data.train_tokens,
            "val_tokens": data.val_tokens,
            "fingerprint": data.fingerprint,
        },
        "total_steps": total,
        "save_every": save_every,
        "keep": keep,
        "num_params": count_params(state.params),
    }
    return RunSetup(out, cfg, tcfg, state, tx, Position(), data, mesh, run_cfg, resumed=False)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class CLIHooks(Hooks):
    """Progress bar, printed evaluations and samples, metrics.jsonl, checkpoints and Ctrl-C."""

    def __init__(self, run: RunSetup, mngr: CheckpointManager) -> None:
        self.run, self.mngr, self.main = run, mngr, jax.process_index() == 0
        self.metrics_path = run.out / "metrics.jsonl"
        self.saved: str | None = None
        self.bar: tqdm | None = None
        self.t0 = time.perf_counter()
        self.tokens0 = 0

    def _print(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def on_start(self, state, pos, total_steps):  # noqa: ANN001
        self.tokens0, self.t0 = pos.tokens_seen, time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=int(state.step), desc="train", unit="step",
                        disable=not self.main, dynamic_ncols=True)  # fmt: skip

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
        save_every = self.run.run_cfg["save_every"]
        return save_every > 0 and step % save_every == 0

    def save(self, state, pos, final):  # noqa: ANN001
        r = self.run
        self.saved = save_checkpoint(self.mngr, state, r.cfg, r.tcfg, pos, r.total_steps)
        if not final:
            self._print(f"saved checkpoint {self.saved}")

    def should_stop(self, step):  # noqa: ANN001
        return CtrlC.pressed

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_training(run: RunSetup) -> int:
    """Write the run's files, train, plot; returns the exit code."""
    out, cfg, tcfg, main_proc = run.out, run.cfg, run.tcfg, jax.process_index() == 0
    start_step = int(run.state.step)
    created = None if run.resumed else runlib.create_run_dir(out)
    mngr = hooks = None
    try:
        history = runlib.read_records(out / "metrics.jsonl", start_step)
        if main_proc:
            if not run.resumed:
                (out / "config.json").write_text(json.dumps(run.run_cfg, indent=2) + "\n")
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        mngr = CheckpointManager(out, keep=run.run_cfg["keep"])
        hooks = CLIHooks(run, mngr)
        CtrlC.check()
        if main_proc:
            d = run.data
            verb = f"Resuming at step {start_step}" if run.resumed else "Training"
            print(
                f"{verb}: {run.run_cfg['num_params']:,} parameters, {d.train_tokens:,} train / "
                f"{d.val_tokens:,} validation tokens, {run.total_steps} steps "
                f"of {tcfg.grad_accum * tcfg.batch_size} x {cfg.context_length} tokens -> {out}",
                flush=True,
            )
        t0 = time.perf_counter()
        try:
            state, _, records = train(
                run.state, run.tx, cfg, tcfg, run.data.train_loader, run.data.val_loader, run.pos, hooks,
                mesh=run.mesh,
            )  # fmt: skip
        finally:
            hooks.close()
        elapsed = time.perf_counter() - t0
        history += records
        if main_proc and history:
            plot_losses(history, out / "loss.png")
    except (Interrupted, KeyboardInterrupt):
        undo = not run.resumed and (mngr is None or not mngr.all_steps())
        return runlib.report_interrupt("", undo, out, created, f"--resume {out}")

    step = int(state.step)
    if CtrlC.pressed:
        resume = f"continue with: python scripts/train.py --resume {out}"
        return runlib.report_stop("", step, run.total_steps, f"saved checkpoint {hooks.saved}", resume)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a bad option: one line, exit 2
    with CtrlC.handling():
        try:
            try:
                CtrlC.check()
                sharding.maybe_initialize_distributed()  # multi-host launchers: join before any JAX call
                run = setup(args)
            except (UsageError, DataError, CheckpointError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            except (Interrupted, KeyboardInterrupt):
                print("interrupted before training began: nothing was written", file=sys.stderr)
                return 130
            if run is None:
                print(f"{args.resume} is already complete: nothing to do (its files are unchanged)")
                return 0
            return run_training(run)
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    # Ctrl-C stays pending while the process re-executes itself: the signal mask and pending
    # signals survive execve, and the new process unblocks them once its handler is installed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    if not CtrlC.pressed:
        try:  # re-run once with the allocator that makes CPU steps faster (see jaxgpt/launch.py)
            from jaxgpt.launch import relaunch_with_fast_allocator
        except ImportError:
            pass
        else:
            relaunch_with_fast_allocator()
            from jaxgpt.xla import enable_compilation_cache

            enable_compilation_cache()  # a second run of the same shapes skips the compile
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a second Ctrl-C where nothing else caught it
        print("interrupted", file=sys.stderr)
        sys.exit(130)
