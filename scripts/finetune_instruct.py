"""Fine-tune a GPT to follow instructions (book chapter 7), answer the test entries, and score them.

    python scripts/finetune_instruct.py --init-from gpt2-medium --out runs/instruct
    python scripts/finetune_instruct.py --from-scratch --preset gpt2-small --limit 200 --out runs/small
    python scripts/finetune_instruct.py --out runs/instruct --resume --judge http://localhost:11434

The book's procedure: the entries of --data in Alpaca-style prompts (--prompt-style phi3 for
exercise 7.1), the first 85% training, the next 10% testing and the last 5% validating; batches
of --batch-size 8 padded with 50256 to their longest entry + 1, every padding target after the
first end-of-text ignored, cut to --allowed-max-length (default: the model's context); AdamW
with --lr 5e-5 and --weight-decay 0.1 for --epochs 2, printing "Ep 1 (Step 000000): Train loss
..., Val loss ..." every --eval-freq steps over --eval-iter batches and a sample answer to the
first validation entry after each epoch. --mask-instructions leaves the prompt's tokens out of
the loss (exercise 7.2). Lengths are rounded up to a multiple of --bucket (32; 0 for the book's
exact shapes), which changes no loss and keeps the number of compilations small.

--data: a JSON list of {"instruction", "input", "output"} entries, such as the book's
instruction-data.json (from the book's repository, rasbt/LLMs-from-scratch, Apache-2.0). The
default is the first that exists of ./instruction-data.json (where the book's code saves it)
and ../shared/data/instruction-data.json beside this checkout. --limit N uses its first N
entries only. --init-from: anything jaxgpt.load reads (a training run, a Hugging Face
directory, a book .pth, OpenAI's GPT-2 directory or name); --from-scratch starts from random
weights of --preset. The model must know GPT-2's 50257 token ids.

--out gets checkpoints/ (after each epoch, with the configs, the data position and the
settings, so --resume continues bit for bit, also with a larger --epochs), metrics.jsonl (one
evaluation per line), loss.png, instruction-data-with-response.json (the test entries with the
model's greedy "model_response", at most --max-new-tokens tokens, written batch by batch) and
results.json (validation loss, the mean loss of the reference answers' tokens, judge scores).
--judge URL asks a larger model to score each answer 0-100 as the book does: Ollama's
/api/chat (a bare http://host:11434 means that) or an OpenAI-compatible .../v1/chat/completions,
model --judge-model (llama3). It is asked once before any work; a judge that fails later costs
no response (they are on disk first), and --resume on the finished run scores them again.

Exit codes: 0 done; 2 bad input (an option, a data file with the entry and field at fault, a
model that cannot be loaded, a judge that does not answer, an --out that is not empty and not
a run to resume), checked before any training, nothing written; 1 a failure during the work;
130 interrupted (Ctrl-C; the checkpoint of the last finished epoch stays, --resume continues).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

# scripts/ is on sys.path when a script runs
import runlib
from benchlib import HintParser, InputError, check_fine_tuning_options, doc_parser, load_start_model, run_cli

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

PROG = "finetune_instruct.py"
FORMAT = "jaxgpt-instruct-1"
RESPONSES = "instruction-data-with-response.json"
DEFAULT_DATA = (Path("instruction-data.json"), ROOT.parent / "shared" / "data" / "instruction-data.json")
BOOK_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
    "instruction-data.json"
)


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__, HintParser)
    p.add_argument("--data", type=Path, help="JSON list of instruction entries (default: see below)")
    p.add_argument("--out", type=Path, required=True, help="run directory to write (or continue)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from", metavar="MODEL", help="starting weights: anything jaxgpt.load reads")
    start.add_argument("--from-scratch", action="store_true", help="random weights of --preset")
    p.add_argument("--preset", default="gpt2-small", help="model with --from-scratch (default: %(default)s)")
    p.add_argument("--prompt-style", choices=("alpaca", "phi3"), default="alpaca", help="default: alpaca")
    p.add_argument("--mask-instructions", action="store_true", help="ignore the prompt's tokens in the loss")
    p.add_argument("--allowed-max-length", type=int, help="cut batches to this length (default: context)")
    p.add_argument("--bucket", type=int, default=32, help="round lengths up to a multiple (0: off; 32)")
    p.add_argument("--limit", type=int, help="use only the first N entries of --data")
    p.add_argument("--epochs", type=int, default=2, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout while fine-tuning (book: 0.0)")
    p.add_argument("--eval-freq", type=int, default=5, help="steps between evaluations (default: 5)")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation (default: 5)")
    p.add_argument("--sample-tokens", type=int, default=50, help="tokens of each epoch's sample (50)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per test answer (256)")
    p.add_argument("--judge", metavar="URL", help="score the answers with this Ollama/OpenAI endpoint")
    p.add_argument("--judge-model", default="llama3", help="the judge's model (default: %(default)s)")
    p.add_argument("--seed", type=int, default=123, help="init, data order, dropout (default: 123)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    return p


# --------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------


def _check_options(args: argparse.Namespace) -> None:
    positive = (
        ("--max-new-tokens", args.max_new_tokens),
        ("--allowed-max-length", args.allowed_max_length),
        ("--limit", args.limit),
    )
    non_negative = (("--bucket", args.bucket), ("--sample-tokens", args.sample_tokens), ("--seed", args.seed))
    check_fine_tuning_options(args, positive, non_negative)
    if not args.resume and not args.init_from and not args.from_scratch:
        raise InputError("give the starting weights: --init-from MODEL or --from-scratch (with --preset)")


def _data_path(args: argparse.Namespace) -> Path:
    if args.data is not None:
        return args.data
    for path in DEFAULT_DATA:
        if path.is_file():
            return path
    raise InputError(
        f"no --data given and no {DEFAULT_DATA[0]} or {DEFAULT_DATA[1]}; "
        f"the book's file is at {BOOK_DATA_URL}"
    )


def _check_out(out: Path) -> None:
    """A new run needs a new or empty --out (never a run's or anyone's files)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if (out / "checkpoints").is_dir():
        raise InputError(f"--out {out} already holds a run; pass --resume to continue it")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} is not empty; choose a new or empty directory")


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the run needs, checked: settings, data, judge, model. Raises InputError."""
    from jaxgpt.config import GPTConfig
    from jaxgpt.instruct import (
        InstructionDataError,
        InstructionDataset,
        JudgeError,
        check_judge,
        load_instruction_data,
        split_data,
    )

    _check_options(args)
    if args.resume:
        meta = runlib.read_run_meta(
            args.out,
            FORMAT,
            f"--resume: {args.out} holds no run (no checkpoints/ directory)",
            f"--out {args.out}: not an instruction fine-tuning run of {PROG}",
        )
        settings = {**meta["settings"], "epochs": args.epochs}
        data_path = Path(settings["data"])
    else:
        _check_out(args.out)
        meta, data_path = None, _data_path(args)
    try:
        data = load_instruction_data(data_path)
    except InstructionDataError as e:
        raise InputError(f"--data {e}") from None
    fingerprint = hashlib.sha256(data_path.read_bytes()).hexdigest()
    if meta and fingerprint != settings["data_sha256"]:
        raise InputError(f"--resume: {data_path} changed since the run in {args.out} started")
    limit = settings["limit"] if meta else args.limit
    data = data[:limit] if limit else data

    if meta:
        cfg, params = GPTConfig.from_dict(meta["model_config"]), None
    else:
        cfg, params = load_start_model(args)
    if cfg.vocab_size < 50257:
        raise InputError(
            f"the model knows {cfg.vocab_size} token ids, but GPT-2's tokenizer and end-of-text need 50257"
        )
    if not meta:
        allowed = args.allowed_max_length or cfg.context_length
        if allowed > cfg.context_length:
            raise InputError(
                f"--allowed-max-length {allowed} is longer than the model's context of {cfg.context_length}"
            )
        settings = {
            "data": str(data_path.resolve()),
            "data_sha256": fingerprint,
            "limit": args.limit,
            "prompt_style": args.prompt_style,
            "mask_instructions": args.mask_instructions,
            "allowed_max_length": allowed,
            "bucket": args.bucket or None,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "weight_decay": args.weight_decay,
            "epochs": args.epochs,
            "eval_freq": args.eval_freq,
            "eval_iter": args.eval_iter,
            "sample_tokens": args.sample_tokens,
            "seed": args.seed,
            "init_from": args.init_from or f"scratch:{args.preset}",
        }
    train, val, test = split_data(data)
    if len(train) < settings["batch_size"] or not val or not test:
        raise InputError(
            f"--data {data_path}: {len(data)} entries split into {len(train)} train / {len(val)} validation "
            f"/ {len(test)} test; each part needs an entry and training --batch-size {settings['batch_size']}"
        )
    if args.judge:
        try:
            check_judge(args.judge, args.judge_model)
        except JudgeError as e:
            raise InputError(f"--judge: {e}") from None
    style = settings["prompt_style"]
    datasets = tuple(InstructionDataset.from_entries(part, style=style) for part in (train, val, test))
    return {"cfg": cfg, "params": params, "meta": meta, "settings": settings,
            "splits": (train, val, test), "datasets": datasets}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _loaders(prep: dict[str, Any]):
    from jaxgpt.instruct import InstructionLoader

    s = prep["settings"]
    common = {
        "batch_size": s["batch_size"],
        "seed": s["seed"],
        "allowed_max_length": s["allowed_max_length"],
        "mask_instructions": s["mask_instructions"],
        "bucket": s["bucket"],
    }
    train_ds, val_ds, test_ds = prep["datasets"]
    return (
        InstructionLoader(train_ds, shuffle=True, drop_last=True, **common),  # as the book's loaders
        InstructionLoader(val_ds, **common),
        InstructionLoader(test_ds, **common),
    )


def _train(args: argparse.Namespace, prep: dict[str, Any]):
    """Train (or continue) to --epochs; returns the final state and the evaluation records."""
    import jax

    from jaxgpt.checkpoint import CheckpointManager, restore_checkpoint, save_checkpoint
    from jaxgpt.instruct import format_input
    from jaxgpt.plot import plot_losses
    from jaxgpt.train import Hooks, Position, TrainConfig, create_train_state, make_optimizer, train

    cfg, s = prep["cfg"], prep["settings"]
    train_loader, val_loader, _ = _loaders(prep)
    steps_per_epoch = len(train_loader)
    total = s["epochs"] * steps_per_epoch
    mngr = CheckpointManager(args.out)
    if prep["meta"] is None:
        tcfg = TrainConfig(
            learning_rate=s["learning_rate"],
            weight_decay=s["weight_decay"],
            batch_size=s["batch_size"],
            num_epochs=s["epochs"],
            eval_freq=s["eval_freq"],
            eval_iter=s["eval_iter"],
            seed=s["seed"],
            start_context=format_input(prep["splits"][1][0], s["prompt_style"]),  # the book's val_data[0]
            sample_tokens=s["sample_tokens"],
        )
        state, _ = create_train_state(cfg, tcfg, jax.random.PRNGKey(s["seed"]), total, prep["params"])
        pos = Position()
    else:
        state, _, cfg, tcfg, pos, _ = restore_checkpoint(mngr)
        tcfg = tcfg.replace(num_epochs=s["epochs"])
        print(f"resuming {args.out} at step {int(state.step)} (epoch {pos.epoch + 1})", file=sys.stderr)
    # The book's AdamW at a constant rate: one optimizer whatever the epochs, so a longer or a
    # resumed run reuses the compiled step (the state's structure does not depend on it either).
    tx = make_optimizer(TrainConfig(learning_rate=s["learning_rate"], weight_decay=s["weight_decay"]), 1)
    metrics_path = args.out / "metrics.jsonl"
    history = runlib.read_records(metrics_path, int(state.step))
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    class _Hooks(Hooks):
        def on_eval(self, record: dict[str, Any]) -> None:
            epoch = min(int(record["epoch"]) + 1, s["epochs"])
            print(  # the book's line, its 0-based global_step
                f"Ep {epoch} (Step {record['step'] - 1:06d}): "
                f"Train loss {record['train_loss']:.3f}, Val loss {record['val_loss']:.3f}",
                flush=True,
            )
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

        def on_epoch_end(self, epoch: int, sample: str) -> None:
            if sample:
                print(sample, flush=True)

        def should_save(self, step: int) -> bool:
            return step % steps_per_epoch == 0

        def save(self, state, pos, final) -> None:  # noqa: ANN001
            extra = {"kind": FORMAT, "settings": s}
            save_checkpoint(mngr, state, cfg, tcfg, pos, total, extra)

    t0 = time.perf_counter()
    state, _, records = train(state, tx, cfg, tcfg, train_loader, val_loader, pos, _Hooks())
    history += records
    if history:
        title = f"instruction fine-tuning, {Path(s['init_from']).name}"
        plot_losses(history, args.out / "loss.png", title=title)
    seconds = time.perf_counter() - t0
    print(f"Training completed in {seconds / 60:.2f} minutes.", flush=True)
    return cfg, state, history, seconds


# --------------------------------------------------------------------------------------------
# Responses and scores
# --------------------------------------------------------------------------------------------


def _respond(args: argparse.Namespace, prep: dict[str, Any], cfg, params, step: int) -> list[dict]:
    """The test entries with their "model_response", written to --out after every batch.

    A complete file of an earlier call for the same checkpoint step and --max-new-tokens is
    read back instead of generating again.
    """
    from jaxgpt.instruct import InstructionDataError, generate_responses, validate_entries, write_json_atomic

    test = prep["splits"][2]
    path = args.out / RESPONSES
    done_path = args.out / ".responses-done.json"
    key = {"step": step, "max_new_tokens": args.max_new_tokens}
    if path.is_file() and done_path.is_file() and json.loads(done_path.read_text()) == key:
        try:
            entries = json.loads(path.read_text())
            validate_entries(entries, str(path), required=("instruction", "output", "model_response"))
            if len(entries) == len(test):
                print(f"answers of step {step} read from {path}", flush=True)
                return entries
        except (json.JSONDecodeError, InstructionDataError):
            pass
    done_path.unlink(missing_ok=True)
    answered: list[dict] = []

    def save(start: int, responses: list[str]) -> None:
        for entry, response in zip(test[start : start + len(responses)], responses, strict=True):
            answered.append({**entry, "model_response": response})
        write_json_atomic(path, answered)

    t0 = time.perf_counter()
    style = prep["settings"]["prompt_style"]
    generate_responses(params, cfg, test, style, args.max_new_tokens, on_batch=save)
    done_path.write_text(json.dumps(key))
    print(f"{len(answered)} answers in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    return answered


def _run(args: argparse.Namespace, prep: dict[str, Any]) -> int:
    import numpy as np

    from jaxgpt.instruct import InstructionLoader, generate_model_scores, response_loss
    from jaxgpt.loss import calc_loss_loader

    cfg, state, history, train_s = _train(args, prep)
    step = int(state.step)
    _, val_loader, test_loader = _loaders(prep)
    s = prep["settings"]
    results: dict[str, Any] = {
        "step": step,
        "epochs": s["epochs"],
        "examples": [len(part) for part in prep["splits"]],
        "val_loss": calc_loss_loader(state.params, cfg, val_loader.iter_epoch(0)),
        "test_loss": calc_loss_loader(state.params, cfg, test_loader.iter_epoch(0)),
        "test_response_loss": response_loss(
            state.params,
            cfg,
            InstructionLoader(
                test_loader.dataset,
                s["batch_size"],
                allowed_max_length=s["allowed_max_length"],
                bucket=s["bucket"],
            ),
        ),  # fmt: skip
        "train_loss_last": history[-1]["train_loss"] if history else None,
        "train_s": train_s,
    }
    print(
        f"Validation loss {results['val_loss']:.3f}; test loss {results['test_loss']:.3f}, "
        f"of the reference answers' tokens {results['test_response_loss']:.3f}",
        flush=True,
    )
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    t0 = time.perf_counter()
    entries = _respond(args, prep, cfg, state.params, step)
    results["answer_s"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for entry in entries[:3]:
        print(f"\n{entry['instruction']}\n\nCorrect response:\n>> {entry['output']}")
        print(f"\nModel response:\n>> {entry['model_response']}\n{'-' * 40}")
    if args.judge:
        scores = generate_model_scores(entries, "model_response", args.judge_model, args.judge)
        print(f"Number of scores: {len(scores)} of {len(entries)}")
        average = float(np.mean(scores)) if scores else float("nan")
        print(f"Average score: {average:.2f}\n")
        results["judge"] = {
            "url": args.judge,
            "model": args.judge_model,
            "scores": scores,
            "average": average,
        }
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jaxgpt.instruct import JudgeError

    args = build_parser().parse_args(argv)
    try:
        prep = _prepare(args)
    except InputError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    created = None if args.out.exists() else args.out
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        return _run(args, prep)
    except KeyboardInterrupt:
        _clean_up(args.out, created)
        print(
            f"{PROG}: interrupted; continue with --resume (the last epoch's checkpoint stays)",
            file=sys.stderr,
        )
        return 130
    except JudgeError as e:
        print(f"{PROG}: {e}; the answers are kept in {args.out / RESPONSES}", file=sys.stderr)
        return 1
    except Exception as e:
        _clean_up(args.out, created)
        print(f"{PROG}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _clean_up(out: Path, created: Path | None) -> None:
    """Remove what a new run wrote before its first checkpoint, so nothing half-made stays."""
    checkpoints = out / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        runlib.undo_new_run(out, created)


if __name__ == "__main__":
    run_cli(PROG, main)
