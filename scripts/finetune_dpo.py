"""Preference-tune an instruction-following GPT with DPO (the book's bonus to chapter 7).

    python scripts/finetune_dpo.py --init-from runs/instruct --out runs/dpo
    python scripts/finetune_dpo.py --from-scratch --preset quickstart --limit 40 --batch-size 4 --out runs/try
    python scripts/finetune_dpo.py --out runs/dpo --resume

The book's procedure: the preference entries split 85/10/5 in file order (training, test,
validation), each pair batched as prompt + chosen and prompt + rejected response with the
prompt and the padding masked out of the log-probabilities, and the policy trained with the DPO
loss against a frozen reference (the same starting weights): --beta 0.1, AdamW --lr 5e-6,
--weight-decay 0.01, --epochs 1, --batch-size 8, evaluations every --eval-freq 5 steps on
--eval-iter 5 batches, printed as the book's lines (loss and reward margins).

--data: a JSON list of entries with instruction, input, chosen and rejected (the book's
instruction-data-with-preference.json; default ../shared/data's copy when present).
--init-from: anything jaxgpt.load reads, normally the run of scripts/finetune_instruct.py;
--from-scratch starts from random weights of --preset (for trying the script out).

--out gets metrics.jsonl (per evaluation: loss, chosen and rejected rewards, reward margin and
preference accuracy of both splits), loss.png and margins.png, reference/ (the frozen starting
weights) and checkpoints/ (every --save-every steps, at the end and on Ctrl-C; --resume
continues exactly). jaxgpt.load(OUT) gives the tuned model.

Exit codes: 0 done; 2 bad input (an option, a preference entry with its index and field, a
model that cannot be loaded or does not fit the data), checked before any training, nothing
written; 1 a failure during training; 130 interrupted (Ctrl-C: once training has begun a
checkpoint is saved first, continue with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# scripts/ is on sys.path when a script runs
import runlib
from benchlib import HintParser, InputError, doc_parser, load_start_model, number, positive_int, run_cli
from runlib import CtrlC, Interrupted, UsageError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

PROG = "finetune_dpo.py"
FORMAT = "jaxgpt-dpo-1"
REFERENCE_FORMAT = "jaxgpt-dpo-reference-1"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "instruction-data-with-preference.json"
# The run's settings: flag -> default (the book's). A resumed run keeps its own.
SETTINGS = {
    "beta": 0.1,
    "lr": 5e-6,
    "weight_decay": 0.01,
    "epochs": 1,
    "batch_size": 8,
    "eval_freq": 5,
    "eval_iter": 5,
    "allowed_max_length": 1024,
    "prompt_style": "alpaca",
    "seed": 123,
    "limit": None,
    "drop_rate": 0.0,
    "save_every": 50,
    "sample_tokens": 50,
    "pad_multiple": 64,
}


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__, HintParser)
    pos_float = number(float, 0, low_open=True)
    p.add_argument("--data", type=Path, help=f"preference JSON (default: {DEFAULT_DATA} when present)")
    p.add_argument("--out", type=Path, required=True, help="run directory (new or empty; or one to --resume)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--init-from", metavar="MODEL", help="starting and reference weights: anything jaxgpt.load reads"
    )
    start.add_argument("--from-scratch", action="store_true", help="random weights of --preset (for trials)")
    p.add_argument("--preset", help="model size with --from-scratch (default: quickstart)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own settings")
    p.add_argument("--beta", type=pos_float, help="DPO temperature (default: 0.1; the book: 0.1 to 0.5)")
    p.add_argument("--lr", type=pos_float, help="AdamW learning rate (default: 5e-6)")
    p.add_argument("--weight-decay", type=number(float, 0), help="AdamW weight decay (default: 0.01)")
    p.add_argument("--epochs", type=positive_int, help="default: 1")
    p.add_argument("--batch-size", type=positive_int, help="pairs per batch (default: 8)")
    p.add_argument("--eval-freq", type=positive_int, help="steps between evaluations (default: 5)")
    p.add_argument("--eval-iter", type=positive_int, help="batches per split in an evaluation (default: 5)")
    p.add_argument(
        "--allowed-max-length", type=positive_int, help="cut sequences to this many tokens (default: 1024)"
    )
    p.add_argument("--prompt-style", choices=["alpaca", "phi3"], help="prompt format (default: alpaca)")
    p.add_argument(
        "--seed", type=number(int, 0), help="data order, dropout, --from-scratch weights (default: 123)"
    )
    p.add_argument("--limit", type=positive_int, help="use only the first N entries of --data (quick runs)")
    p.add_argument(
        "--drop-rate", type=number(float, 0, 0.99), help="the policy's dropout (default: 0.0, the book's)"
    )
    p.add_argument(
        "--save-every", type=number(int, 0), help="steps between checkpoints, 0: end only (default: 50)"
    )
    p.add_argument(
        "--sample-tokens",
        type=number(int, 0),
        help="tokens of the response printed after each epoch (default: 50)",
    )
    p.add_argument(
        "--pad-multiple", type=positive_int, help="pad batch lengths to a multiple of this (default: 64)"
    )
    return p


# --------------------------------------------------------------------------------------------
# Checks and setup (nothing written)
# --------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _load_model(args: argparse.Namespace, settings: dict[str, Any]):
    """(cfg, params) of the starting weights, the policy's dropout set."""
    start = argparse.Namespace(
        from_scratch=args.from_scratch,
        init_from=args.init_from,
        preset=args.preset or "quickstart",
        drop_rate=settings["drop_rate"],
        seed=settings["seed"],
    )
    return load_start_model(start)


def _read(path: Path) -> list[dict[str, str]]:
    from jaxgpt.dpo import PreferenceDataError, read_preference_data

    try:
        return read_preference_data(path)
    except PreferenceDataError as e:
        raise InputError(f"--data {e}") from None


def _read_entries(path: Path, settings: dict[str, Any], cfg) -> dict[str, Any]:  # noqa: ANN001
    """The encoded (train, validation, test) entries of ``path``, the raw validation entries and
    the fingerprint of all that is used."""
    from jaxgpt import dpo

    entries = _read(path)[: settings["limit"]]
    items = dpo.encode_preference_data(entries, settings["prompt_style"])
    allowed = min(settings["allowed_max_length"], cfg.context_length)
    try:
        dpo.check_fits(items, allowed, f"--data {path}: ")
    except dpo.PreferenceDataError as e:
        raise InputError(
            f"{e} (--allowed-max-length, or the model's context length {cfg.context_length})"
        ) from None
    train, val, test = dpo.split_preference_data(items)
    if len(train) < settings["batch_size"]:
        raise InputError(
            f"--data {path}: the training split has {len(train)} entries, fewer than --batch-size "
            f"{settings['batch_size']} (use more entries or a smaller batch)"
        )
    if not val:
        raise InputError(
            f"--data {path}: {len(entries)} entries leave no validation entry (the book's last 5%)"
        )
    val_entries = dpo.split_preference_data(entries)[1]
    return {"splits": (train, val, test), "val_entries": val_entries, "fingerprint": dpo.fingerprint(items)}


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything training needs, checked; raises InputError and writes nothing."""
    import jax
    import numpy as np

    from jaxgpt import dpo
    from jaxgpt.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
    from jaxgpt.config import GPTConfig
    from jaxgpt.model import init_params
    from jaxgpt.train import Position, TrainState

    given = [name for name in SETTINGS if getattr(args, name) is not None]
    if args.resume:
        extra = given + [n for n in ("data", "init_from", "preset") if getattr(args, n)]
        extra += ["from_scratch"] if args.from_scratch else []
        if extra:
            raise InputError(
                f"--resume continues with the run's saved settings; drop {', '.join(map(_flag, extra))}"
            )
        meta = runlib.read_run_meta(
            args.out,
            FORMAT,
            f"--resume: {args.out} holds no run to resume (no checkpoints/ directory)",
            f"--out {args.out}: not a DPO run of {PROG}",
        )
        settings, cfg = meta["settings"], GPTConfig.from_dict(meta["model_config"])
        data = Path(settings["data"])
        read = _read_entries(data, settings, cfg)
        if read["fingerprint"] != settings["fingerprint"]:
            raise InputError(f"--resume: the data of {args.out} ({data}) changed since the run started")
        tx = dpo.make_dpo_optimizer(settings["lr"], settings["weight_decay"])
        template = jax.eval_shape(lambda: dpo.create_dpo_state(init_params(cfg, jax.random.PRNGKey(0)), tx))
        like = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template)
        opt_like = {"opt_state": like.opt_state, "step": like.step, "rng": like.rng}
        try:
            _, ref_params = load_checkpoint(args.out / "reference")
            _, params, opt, meta = CheckpointManager(args.out, read_only=True).restore(
                None, params_like=like.params, state_like=opt_like
            )
        except (CheckpointError, ValueError) as e:
            raise InputError(f"--resume {args.out}: {e}") from None
        state = TrainState(params=params, opt_state=opt["opt_state"], step=opt["step"], rng=opt["rng"])
        pos = Position(**meta["position"])
    else:
        if not args.init_from and not args.from_scratch:
            raise InputError(
                "give the starting weights: --init-from MODEL (instruction-tuned) or --from-scratch"
            )
        if args.preset and not args.from_scratch:
            raise InputError(
                "--preset goes with --from-scratch; --init-from takes the model's own configuration"
            )
        settings = {
            name: SETTINGS[name] if getattr(args, name) is None else getattr(args, name) for name in SETTINGS
        }
        data = args.data
        if data is None:
            if not DEFAULT_DATA.is_file():
                raise InputError(f"--data is required (no default copy at {DEFAULT_DATA})")
            data = DEFAULT_DATA
        try:
            runlib.check_new_out(args.out, "--resume --out")
        except UsageError as e:
            raise InputError(str(e)) from None
        _read(data)  # the entries are checked before the model loads
        cfg, ref_params = _load_model(args, settings)
        if cfg.vocab_size < 50257:
            raise InputError(f"the model knows {cfg.vocab_size} token ids, but GPT-2's tokenizer needs 50257")
        read = _read_entries(Path(data), settings, cfg)
        settings = {
            **settings,
            "data": str(Path(data).resolve()),
            "fingerprint": read["fingerprint"],
            "init_from": args.init_from,
        }
        settings["preset"] = (args.preset or "quickstart") if args.from_scratch else None
        tx = dpo.make_dpo_optimizer(settings["lr"], settings["weight_decay"])
        state, pos = dpo.create_dpo_state(ref_params, tx, settings["seed"]), Position()
    allowed = min(settings["allowed_max_length"], cfg.context_length)
    train, val, test = read["splits"]
    loaders = [
        dpo.PreferenceLoader(
            tuple(split),
            settings["batch_size"],
            shuffle,
            shuffle,
            settings["seed"],
            allowed,
            settings["pad_multiple"],
        )
        for split, shuffle in ((train, True), (val, False))  # the book: train shuffled, drop_last
    ]
    return {
        "cfg": cfg,
        "settings": settings,
        "state": state,
        "ref_params": ref_params,
        "tx": tx,
        "pos": pos,
        "loaders": loaders,
        "sizes": (len(train), len(val), len(test)),
        "val_entries": read["val_entries"],
        "resumed": args.resume,
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _plot(records: list[dict[str, Any]], out: Path) -> None:
    from jaxgpt.plot import plot_losses

    plot_losses(records, out / "loss.png")
    margins = [
        {**r, "train_loss": r["train_reward_margin"], "val_loss": r["val_reward_margin"]} for r in records
    ]
    plot_losses(margins, out / "margins.png", label="reward margins")


def _make_hooks(prep: dict[str, Any], out: Path, mngr, ctrl_c):  # noqa: ANN001
    import jax
    import numpy as np

    from jaxgpt import dpo
    from jaxgpt.train import Hooks, NonFiniteLossError

    cfg, settings = prep["cfg"], prep["settings"]

    class DPOHooks(Hooks):
        """Printed evaluations, metrics.jsonl, checkpoints, plots and Ctrl-C."""

        saved: str | None = None

        def on_eval(self, record):  # noqa: ANN001
            print(dpo.eval_line(max(1, math.ceil(record["epoch"])), record), flush=True)
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

        def on_epoch_end(self, epoch, sample):  # noqa: ANN001
            print(f"Ep {epoch + 1} sample: {sample}", flush=True)

        def should_save(self, step):  # noqa: ANN001
            return settings["save_every"] > 0 and step % settings["save_every"] == 0

        def save(self, state, pos, final):  # noqa: ANN001
            if not all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params)):
                raise NonFiniteLossError(f"non-finite parameters at step {int(state.step)}; nothing saved")
            meta = {
                "kind": FORMAT,
                "model_config": cfg.to_dict(),
                "settings": settings,
                "position": dataclasses.asdict(pos),
                "total_steps": settings["epochs"] * len(prep["loaders"][0]),
            }
            opt = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
            self.saved = str(mngr.save(int(state.step), state.params, opt, meta))
            if not final:
                print(f"saved checkpoint {self.saved}", flush=True)

        def should_stop(self, step):  # noqa: ANN001
            return ctrl_c.pressed

    return DPOHooks()


def _sampler(prep: dict[str, Any]):
    """params -> the response to the third validation entry (the book's start context), or None."""
    n = prep["settings"]["sample_tokens"]
    if n == 0:
        return None
    import jax.numpy as jnp

    from jaxgpt.generation import generate
    from jaxgpt.instruct import extract_response, format_prompt
    from jaxgpt.tokenizer import get_tokenizer

    cfg, style, entries = prep["cfg"], prep["settings"]["prompt_style"], prep["val_entries"]
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(format_prompt(entries[min(2, len(entries) - 1)], style))
    prompt = prompt[-max(cfg.context_length - n, 1) :]  # room for the response within the context

    def sample(params) -> str:  # noqa: ANN001
        new = min(n, cfg.context_length - len(prompt))
        ids = generate(params, cfg, jnp.asarray([prompt], jnp.int32), new, eos_id=50256)
        text = tokenizer.decode([int(t) for t in ids[0] if int(t) != 50256])
        return extract_response(text, style).replace("\n", " ")

    return sample


def _train(args: argparse.Namespace, prep: dict[str, Any], ctrl_c) -> int:
    from jaxgpt import dpo
    from jaxgpt.checkpoint import CheckpointManager

    out, settings, cfg = args.out, prep["settings"], prep["cfg"]
    start_step = int(prep["state"].step)
    history = runlib.read_records(out / "metrics.jsonl", start_step)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    mngr = CheckpointManager(out, keep=3)
    if not prep["resumed"]:
        import jax.numpy as jnp

        meta = {"kind": REFERENCE_FORMAT, "model_config": cfg.to_dict()}
        CheckpointManager(out / "reference").save(
            0, prep["ref_params"], {"step": jnp.zeros((), jnp.int32)}, meta
        )
    hooks = _make_hooks(prep, out, mngr, ctrl_c)
    train_loader, val_loader = prep["loaders"]
    n_train, n_val, n_test = prep["sizes"]
    total = settings["epochs"] * len(train_loader)
    verb = f"Resuming at step {start_step}" if prep["resumed"] else "DPO"
    print(
        f"{verb}: {n_train} / {n_val} / {n_test} train / validation / test pairs, {total} steps of "
        f"{settings['batch_size']} pairs, beta {settings['beta']} -> {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    state, _, records = dpo.train_dpo(
        prep["state"], prep["ref_params"], prep["tx"], cfg, train_loader, val_loader,
        beta=settings["beta"], num_epochs=settings["epochs"], eval_freq=settings["eval_freq"],
        eval_iter=settings["eval_iter"], pos=prep["pos"], hooks=hooks, sample=_sampler(prep),
    )  # fmt: skip
    history += records
    if history:
        _plot(history, out)
    step = int(state.step)
    if ctrl_c.pressed:
        resume = f"continue with --out {out} --resume"
        return runlib.report_stop(f"{PROG}: ", step, total, f"saved {hooks.saved}", resume)
    last = history[-1] if history else {}
    print(
        f"Done: {step} steps in {(time.perf_counter() - t0) / 60:.1f} min; "
        f"val loss {last.get('val_loss', math.nan):.3f}, "
        f"val reward margin {last.get('val_reward_margin', math.nan):.3f}, "
        f"val preference accuracy {last.get('val_accuracy', math.nan):.2f}; checkpoint {hooks.saved}",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    CtrlC.pressed = False
    with CtrlC.handling():
        try:
            prep = _prepare(args)
            CtrlC.check()
        except InputError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        except (Interrupted, KeyboardInterrupt):
            print(f"{PROG}: interrupted before training began: nothing was written", file=sys.stderr)
            return 130
        if int(prep["state"].step) >= prep["settings"]["epochs"] * len(prep["loaders"][0]):
            print(f"{args.out} is already complete: nothing to do (its files are unchanged)")
            return 0
        created = None if prep["resumed"] else runlib.create_run_dir(args.out)
        try:
            return _train(args, prep, CtrlC)
        except (Interrupted, KeyboardInterrupt):
            undo = not prep["resumed"] and not (args.out / "checkpoints").is_dir()
            return runlib.report_interrupt(f"{PROG}: ", undo, args.out, created, f"--out {args.out} --resume")
        except Exception as e:
            print(f"{PROG}: training failed: {type(e).__name__}: {e}", file=sys.stderr)
            if not prep["resumed"] and not (args.out / "checkpoints").is_dir():
                runlib.undo_new_run(args.out, created)
            return 1


if __name__ == "__main__":
    run_cli(PROG, main)
