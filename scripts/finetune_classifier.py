"""Fine-tune a GPT as a text classifier (book chapter 6), or classify a text with a fine-tuned one.

    python scripts/finetune_classifier.py --data SMSSpamCollection --init-from gpt2 --out runs/spam
    python scripts/finetune_classifier.py --data reviews.csv --from-scratch --preset gpt2-small --out runs/r
    python scripts/finetune_classifier.py --out runs/spam --classify "You won a free cruise, call now"

The book's procedure: every class cut to the size of the smallest (--seed), split 70/10/20,
token ids padded with 50256 to the longest training text (or --max-length), a new head of one
output per class, and only --trainable parts training (the book's: the last block, the final
norm and the head) with AdamW, --epochs 5, --batch-size 8, --lr 5e-5, --weight-decay 0.1.
--lora-rank 16 trains LoRA adapters (appendix E, --lora-alpha 16) on every block linear and the
head instead, all weights frozen.

--data: a label<TAB>text file (the UCI SMS Spam Collection's form) or a .csv with a header
naming "text" and "label" columns; any number of classes. --init-from: anything jaxgpt.load
reads (a training run, a Hugging Face directory, a book .pth, OpenAI's GPT-2 directory or name);
--from-scratch starts from random weights of --preset. The model must know GPT-2's 50257 token ids.

--out gets checkpoints/ (one per epoch, with the configs and the history, so --resume continues
exactly), metrics.json (the book's losses and accuracies), loss.png and accuracy.png (the book's
figures 6.16 and 6.17), and results.json (train, validation and test accuracy at the end).
--classify TEXT prints the class a fine-tuned run in --out gives TEXT.

Exit codes: 0 done; 2 bad input (an option, a file with the wrong shape with its line, a model
that cannot be loaded or does not fit the data), checked before any training, nothing written;
1 a failure during training; 130 interrupted (Ctrl-C; the checkpoint of the last finished epoch
stays, --resume continues from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

# scripts/ is on sys.path when a script runs
import runlib
from benchlib import InputError, check_fine_tuning_options, doc_parser, load_start_model, run_cli

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

PROG = "finetune_classifier.py"
FORMAT = "jaxgpt-classifier-1"


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument("--data", type=Path, help="label<TAB>text file or text,label .csv (required to train)")
    p.add_argument(
        "--out", type=Path, required=True, help="run directory to write (or read, with --classify)"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from", metavar="MODEL", help="starting weights: anything jaxgpt.load reads")
    start.add_argument("--from-scratch", action="store_true", help="random weights of --preset")
    p.add_argument(
        "--preset", default="gpt2-small", help="model size with --from-scratch (default: %(default)s)"
    )
    p.add_argument(
        "--trainable",
        help="last-block (the book's, the default), last-N (N last blocks + final norm + head), head or all",
    )
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead (appendix E)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--max-length", type=int, help="pad and truncate to this many tokens (default: longest)")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout while fine-tuning (book: 0.0)")
    p.add_argument(
        "--eval-freq", type=int, default=50, help="steps between loss evaluations (default: %(default)s)"
    )
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=123, help="balancing, split, head, order (default: %(default)s)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--classify", metavar="TEXT", help="print the class the run in --out gives TEXT")
    return p


def _check_options(args: argparse.Namespace) -> None:
    check_fine_tuning_options(args, (("--max-length", args.max_length),))
    if args.lora_rank is not None and args.lora_rank < 1:
        raise InputError(f"--lora-rank must be a positive integer, got {args.lora_rank}")
    if not args.lora_alpha > 0:
        raise InputError(f"--lora-alpha must be a positive number, got {args.lora_alpha}")
    if args.lora_rank is not None and args.trainable is not None:
        raise InputError("--trainable and --lora-rank exclude each other: with LoRA only the adapters train")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.data is None:
        raise InputError("--data is required: a label<TAB>text file or a text,label .csv")
    if not args.resume and not args.init_from and not args.from_scratch:
        raise InputError("give the starting weights: --init-from MODEL or --from-scratch (with --preset)")


def _read_meta(out: Path) -> dict[str, Any]:
    """The checkpoint metadata of the classifier run in ``out``; InputError when there is none."""
    return runlib.read_run_meta(
        out,
        FORMAT,
        f"--out {out} holds no run (no checkpoints/ directory)",
        f"--out {out}: not a classifier run of {PROG}",
    )


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything training needs, checked: data, datasets, model, settings. Raises InputError."""
    from jaxgpt.classify import (
        ClassifyDataError,
        balance_classes,
        make_dataset,
        parse_trainable,
        random_split,
        read_labeled_texts,
    )
    from jaxgpt.config import GPTConfig
    from jaxgpt.tokenizer import get_tokenizer

    _check_options(args)
    has_run = (args.out / "checkpoints").is_dir()
    if args.resume and not has_run:
        raise InputError(f"--resume: {args.out} holds no run to resume")
    if not args.resume and args.out.exists() and any(args.out.iterdir()):
        raise InputError(
            f"--out {args.out} is not empty; pass --resume to continue its run or choose another"
        )
    meta = _read_meta(args.out) if args.resume else None
    settings = meta["settings"] if meta else None
    try:
        labels = settings["label_names"] if settings else None
        data = read_labeled_texts(args.data, labels)
    except ClassifyDataError as e:
        raise InputError(f"--data {e}") from None

    if meta:
        cfg = GPTConfig.from_dict(meta["model_config"])
        params = None
    else:
        cfg, params = load_start_model(args)
    if cfg.vocab_size < 50257:
        raise InputError(
            f"the model knows {cfg.vocab_size} token ids, but GPT-2's tokenizer and padding token need 50257"
        )
    lora_rank = settings["lora_rank"] if settings else args.lora_rank
    trainable = settings["trainable"] if settings else args.trainable or "last-block"
    if lora_rank is None:
        try:
            parse_trainable(trainable, cfg.n_layers)
        except ValueError as e:
            raise InputError(f"--trainable: {e}") from None
    else:
        trainable = "lora"

    seed = settings["seed"] if settings else args.seed
    max_length = settings["max_length"] if settings else args.max_length
    train, val, test = random_split(balance_classes(data, seed), 0.7, 0.1, seed)
    batch_size = settings["batch_size"] if settings else args.batch_size
    if len(train) < batch_size:
        raise InputError(
            f"--data {args.data}: the balanced training split has {len(train)} texts, fewer than "
            f"--batch-size {batch_size}"
        )
    tokenizer = get_tokenizer()
    try:
        train_ds = make_dataset(train, tokenizer, max_length, cfg.context_length, where=str(args.data))
        max_length = train_ds.max_length
        val_ds = make_dataset(val, tokenizer, max_length, cfg.context_length, where=str(args.data))
        test_ds = make_dataset(test, tokenizer, max_length, cfg.context_length, where=str(args.data))
    except ClassifyDataError as e:
        flag = "--max-length" if str(e).startswith("max length") else "--data"
        raise InputError(f"{flag}: {e}") from None
    settings = settings or {
        "label_names": list(data.label_names),
        "max_length": max_length,
        "trainable": trainable,
        "lora_rank": lora_rank,
        "lora_alpha": args.lora_alpha,
        "seed": seed,
        "learning_rate": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "eval_freq": args.eval_freq,
        "eval_iter": args.eval_iter,
        "data": str(args.data),
    }
    if meta:
        settings = {**settings, "epochs": args.epochs}
    return {
        "cfg": cfg,
        "params": params,
        "meta": meta,
        "settings": settings,
        "datasets": (train_ds, val_ds, test_ds),
        "counts": data.counts(),
    }


def _plot(history: dict[str, Any], out: Path) -> None:
    """loss.png and accuracy.png as the book's ``plot_values`` draws them: per epoch, with the
    examples seen on a second x-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    epochs = history["epochs_done"]
    for label, train, val, name in (
        ("loss", history["train_losses"], history["val_losses"], "loss.png"),
        ("accuracy", history["train_accs"], history["val_accs"], "accuracy.png"),
    ):
        if not train:
            continue
        x = np.linspace(0, epochs, len(train))
        fig, ax1 = plt.subplots(figsize=(5, 3))
        ax1.plot(x, train, label=f"Training {label}")
        ax1.plot(x, val, linestyle="-.", label=f"Validation {label}")
        ax1.set_xlabel("Epochs")
        ax1.set_ylabel(label.capitalize())
        ax1.legend()
        ax2 = ax1.twiny()
        ax2.plot(np.linspace(0, history["examples_seen"], len(train)), train, alpha=0)
        ax2.set_xlabel("Examples seen")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def _train(args: argparse.Namespace, prep: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np

    from jaxgpt import classify
    from jaxgpt.checkpoint import CheckpointManager

    cfg, settings = prep["cfg"], prep["settings"]
    train_ds, val_ds, test_ds = prep["datasets"]
    num_classes = len(settings["label_names"])
    tx = classify.make_classifier_optimizer(settings["learning_rate"], settings["weight_decay"])
    loaders = (
        classify.ClassificationLoader(train_ds, settings["batch_size"], True, True, settings["seed"]),
        classify.ClassificationLoader(val_ds, settings["batch_size"]),
        classify.ClassificationLoader(test_ds, settings["batch_size"]),
    )
    mngr = CheckpointManager(args.out)
    if prep["meta"] is None:
        params = classify.add_classification_head(
            prep["params"], cfg, num_classes, jax.random.PRNGKey(settings["seed"])
        )
        state = _fresh_state(params, cfg, tx, settings)
        history = classify.ClassifierHistory.empty()
    else:
        state, history = _restore(mngr, cfg, tx, settings, prep["meta"])
        print(f"resuming {args.out} after epoch {history.epochs_done}", file=sys.stderr)

    def save(state: classify.ClassifierState, history: classify.ClassifierHistory) -> None:
        record = dataclasses.asdict(history)
        meta = {"kind": FORMAT, "model_config": cfg.to_dict(), "settings": settings, "history": record}
        opt = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
        if state.lora_alpha is None:
            mngr.save(int(state.step), state.params, opt, meta)
        else:  # the frozen weights as they were, and the adapters beside the optimizer state
            mngr.save(int(state.step), state.frozen, {**opt, "adapters": state.trainable}, meta)
        (args.out / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
        _plot(record, args.out)

    state, history = classify.train_classifier_simple(
        state,
        tx,
        cfg,
        loaders[0],
        loaders[1],
        settings["epochs"],
        settings["eval_freq"],
        settings["eval_iter"],
        history=history,
        on_epoch_end=save,
    )
    params, frozen = state.eval_parts()
    accs = [
        classify.calc_accuracy_loader(params, cfg, loader.iter_epoch(0), frozen=frozen) for loader in loaders
    ]
    print(f"Training accuracy: {accs[0] * 100:.2f}%")
    print(f"Validation accuracy: {accs[1] * 100:.2f}%")
    print(f"Test accuracy: {accs[2] * 100:.2f}%")
    results = {
        "train_accuracy": accs[0],
        "val_accuracy": accs[1],
        "test_accuracy": accs[2],
        "examples": [len(train_ds), len(val_ds), len(test_ds)],
        "class_counts": prep["counts"],
        "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(state.trainable))),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _fresh_state(params, cfg, tx, settings):
    """The state that starts fine-tuning ``params`` (a classifier) as ``settings`` say."""
    import jax

    from jaxgpt import classify, lora

    seed = settings["seed"]
    if settings["lora_rank"] is None:
        return classify.create_classifier_state(params, cfg, tx, settings["trainable"], seed)
    adapters = lora.init_lora(params, settings["lora_rank"], jax.random.PRNGKey(seed + 1))
    return lora.create_lora_state(params, tx, adapters, settings["lora_alpha"], seed)


def _restore(mngr, cfg, tx, settings, meta):
    """(state, history) of the latest checkpoint in ``mngr``, exactly as it was saved."""
    import jax
    import numpy as np

    from jaxgpt import classify
    from jaxgpt.model import init_params

    def template():
        key = jax.random.PRNGKey(0)
        num_classes = len(settings["label_names"])
        params = classify.add_classification_head(init_params(cfg, key), cfg, num_classes, key)
        return _fresh_state(params, cfg, tx, settings)

    shapes = jax.eval_shape(template)
    like = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    opt_like = {"opt_state": like.opt_state, "step": like.step, "rng": like.rng}
    if shapes.lora_alpha is None:
        _, params, opt, _ = mngr.restore(None, params_like=like.params, state_like=opt_like)
        trainable, frozen = classify.partition_params(params, cfg, settings["trainable"])
    else:
        opt_like["adapters"] = like.trainable
        _, frozen, opt, _ = mngr.restore(None, params_like=like.frozen, state_like=opt_like)
        trainable = opt["adapters"]
    state = classify.ClassifierState(
        trainable, frozen, opt["opt_state"], opt["step"], opt["rng"], lora_alpha=shapes.lora_alpha
    )
    return state, classify.ClassifierHistory(**meta["history"])


def _classify(args: argparse.Namespace) -> int:
    from jaxgpt.checkpoint import CheckpointError, CheckpointManager
    from jaxgpt.classify import classify_review, make_classifier_optimizer
    from jaxgpt.config import GPTConfig

    meta = _read_meta(args.out)
    cfg, settings = GPTConfig.from_dict(meta["model_config"]), meta["settings"]
    tx = make_classifier_optimizer(settings["learning_rate"], settings["weight_decay"])
    try:
        state, _ = _restore(CheckpointManager(args.out, read_only=True), cfg, tx, settings, meta)
    except CheckpointError as e:
        raise InputError(f"--out {args.out}: {e}") from None
    params = state.params
    print(classify_review(args.classify, params, cfg, settings["max_length"], settings["label_names"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.classify is not None:
        try:
            return _classify(args)
        except (InputError, ValueError) as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
    try:
        prep = _prepare(args)
    except InputError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    created = not args.out.exists()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        _train(args, prep)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the last finished epoch's checkpoint is in {args.out}", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"{PROG}: training failed: {type(e).__name__}: {e}", file=sys.stderr)
        if created and not (args.out / "checkpoints").is_dir():
            shutil.rmtree(args.out, ignore_errors=True)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(PROG, main)
