"""Chapter 6 side by side: jaxgpt and the book's PyTorch code fine-tune the same classifier.

    python scripts/compare_classifier.py --data ../shared/data/SMSSpamCollection --json out.json
    python scripts/compare_classifier.py --data ../shared/data/SMSSpamCollection --steps 130 --epochs 5
    python scripts/compare_classifier.py --data ../shared/data/SMSSpamCollection --init-from runs/qs

The book's chapter 6 model (``llms_from_scratch.ch04.GPTModel`` with chapter 6's ``BASE_CONFIG``:
gpt2-small, query/key/value biases, dropout 0) is built under ``torch.manual_seed(123)``, frozen
as section 6.5 freezes it, given its ``out_head = Linear(768, 2)``, and imported into jaxgpt, so
both start from the same weights. Both then train on the same batches (jaxgpt's reading, balancing,
split and shuffled order of the data, padded to the longest training message) with AdamW 5e-5 and
weight decay 0.1: jaxgpt with its jitted step, the book with the body of its
``train_classifier_simple`` (``ch06.calc_loss_batch``, ``backward``, ``optimizer.step``). Each
epoch takes the first ``--steps`` batches of its shuffled order; the losses are evaluated every
``--eval-freq`` steps over ``--eval-iter`` batches, and at the end the accuracy over
``--train-acc-batches`` training batches and the whole validation and test sets, with the book's
``calc_accuracy_loader`` on its side. jaxgpt runs first, then the book; wall and CPU time of each.

By default the weights are random (the book's "from scratch" setting): the book's model as its
seed gives it, for want of OpenAI's weights where this was written. ``--init-from`` starts instead
from a pretrained model (anything ``jaxgpt.load`` reads, such as a run of ``scripts/train.py``):
its weights go into the book's ``GPTModel`` built with its configuration (dropout 0), whose
language-model head chapter 6 replaces by the classification head, so tied or untied makes no
difference; the freezing, the seeded head and the rest are as above.

Exit codes: 0 done; 2 bad input (an option, the data file, the starting weights), before any
training; 1 a failure during training; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchlib import doc_parser, positive_int, run_cli, usage  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

PROG = "compare_classifier.py"


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument("--data", type=Path, required=True, help="label<TAB>text file (the SMS Spam Collection)")
    p.add_argument("--epochs", type=positive_int, default=1, help="default: %(default)s (the book: 5)")
    p.add_argument("--steps", type=positive_int, default=130, help="batches per epoch (default all 130)")
    p.add_argument("--eval-freq", type=positive_int, default=50, help="default: %(default)s")
    p.add_argument("--eval-iter", type=positive_int, default=5, help="default: %(default)s")
    p.add_argument(
        "--train-acc-batches", type=positive_int, help="training batches for the final accuracy (default all)"
    )
    p.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start from this pretrained language model instead of the book's random gpt2-small: a "
        "training run, a Hugging Face directory, a book .pth, ... (anything jaxgpt.load reads)",
    )
    p.add_argument("--json", type=Path, help="also write the results to this file")
    return p


def _book_model(init_from: str | None = None):
    """The book's chapter 6 classifier, frozen as 6.5 freezes it, and the same weights imported
    into jaxgpt: gpt2-small from random weights, or the language model at ``init_from``."""
    import numpy as np
    import torch
    from llms_from_scratch import ch04

    from jaxgpt.classify import classifier_from_book_state_dict
    from jaxgpt.weights import book_state_dict, classifier_classes, load

    if init_from is None:
        base = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
        base.update(emb_dim=768, n_layers=12, n_heads=12)  # gpt2-small (124M)
        torch.manual_seed(123)
        model = ch04.GPTModel(base)
    else:
        lm_cfg, lm_params = load(init_from)
        if classifier_classes(lm_params) is not None:
            raise ValueError(f"{init_from} is a classifier; expected a pretrained language model")
        base = {
            "vocab_size": lm_cfg.vocab_size,
            "context_length": lm_cfg.context_length,
            "emb_dim": lm_cfg.emb_dim,
            "n_heads": lm_cfg.n_heads,
            "n_layers": lm_cfg.n_layers,
            "drop_rate": 0.0,
            "qkv_bias": lm_cfg.qkv_bias,
        }
        state = book_state_dict(lm_params, lm_cfg)  # a tied model's head comes as a copy of tok_emb
        torch.manual_seed(123)
        model = ch04.GPTModel(base)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    for param in model.parameters():
        param.requires_grad = False
    torch.manual_seed(123)
    model.out_head = torch.nn.Linear(in_features=base["emb_dim"], out_features=2)
    for param in model.trf_blocks[-1].parameters():
        param.requires_grad = True
    for param in model.final_norm.parameters():
        param.requires_grad = True
    cfg, params = classifier_from_book_state_dict(model.state_dict(), n_heads=base["n_heads"])
    return model, cfg.replace(drop_rate=0.0), params


def _run_jaxgpt(cfg, params, plan, args) -> dict:
    import jax.numpy as jnp

    from jaxgpt import classify

    tx = classify.make_classifier_optimizer(5e-5, 0.1)
    state = classify.create_classifier_state(params, cfg, tx, "last-block")
    step_fn = classify.jit_classifier_train_step(cfg, tx)
    losses, step = [], -1

    def evaluate():
        p, f = state.eval_parts()
        return [
            classify.calc_loss_loader(p, cfg, plan["eval_train"], args.eval_iter, frozen=f),
            classify.calc_loss_loader(p, cfg, plan["val"], args.eval_iter, frozen=f),
        ]

    for epoch in plan["epochs"]:
        for x, y in epoch:
            state, _ = step_fn(state, (jnp.asarray(x), jnp.asarray(y)))
            step += 1
            if step % args.eval_freq == 0:
                losses.append(evaluate())
    p, f = state.eval_parts()
    accs = [
        classify.calc_accuracy_loader(p, cfg, plan["eval_train"], args.train_acc_batches, frozen=f),
        classify.calc_accuracy_loader(p, cfg, plan["val"], frozen=f),
        classify.calc_accuracy_loader(p, cfg, plan["test"], frozen=f),
    ]
    return {"losses": losses, "accuracy": accs}


def _run_book(model, plan, args) -> dict:
    import torch
    from llms_from_scratch import ch06

    def tensors(batches):
        return [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in batches]

    eval_train, val, test = tensors(plan["eval_train"]), tensors(plan["val"]), tensors(plan["test"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    losses, step = [], -1
    for epoch in plan["epochs"]:
        model.train()
        for input_batch, target_batch in tensors(epoch):  # train_classifier_simple's inner loop
            optimizer.zero_grad()
            loss = ch06.calc_loss_batch(input_batch, target_batch, model, "cpu")
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    losses.append(
                        [
                            ch06.calc_loss_loader(eval_train, model, "cpu", num_batches=args.eval_iter),
                            ch06.calc_loss_loader(val, model, "cpu", num_batches=args.eval_iter),
                        ]
                    )
                model.train()
    model.eval()
    accs = [
        ch06.calc_accuracy_loader(eval_train, model, "cpu", num_batches=args.train_acc_batches),
        ch06.calc_accuracy_loader(val, model, "cpu"),
        ch06.calc_accuracy_loader(test, model, "cpu"),
    ]
    return {"losses": losses, "accuracy": accs}


def _timed(fn, *a) -> dict:
    u0, t0 = usage(), time.perf_counter()
    out = fn(*a)
    u1 = usage()
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = u1[0] - u0[0] + u1[1] - u0[1]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import llms_from_scratch.ch06  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        print(f"{PROG}: the book's code is needed ({e}): pip install -e '.[reference]'", file=sys.stderr)
        return 2
    from jaxgpt import classify
    from jaxgpt.tokenizer import get_tokenizer

    try:
        data = classify.read_labeled_texts(args.data)
        train, val, test = classify.random_split(classify.balance_classes(data, 123), 0.7, 0.1, 123)
    except (classify.ClassifyDataError, FileNotFoundError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        model, cfg, params = _book_model(args.init_from)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"{PROG}: --init-from: {e}", file=sys.stderr)
        return 2
    try:
        tokenizer = get_tokenizer()
        where = str(args.data)
        train_ds = classify.make_dataset(train, tokenizer, context_length=cfg.context_length, where=where)
        val_ds = classify.make_dataset(val, tokenizer, train_ds.max_length)
        test_ds = classify.make_dataset(test, tokenizer, train_ds.max_length)
    except (classify.ClassifyDataError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    loader = classify.ClassificationLoader(train_ds, 8, shuffle=True, drop_last=True, seed=123)
    plan = {
        "epochs": [list(loader.iter_epoch(e))[: args.steps] for e in range(args.epochs)],
        "eval_train": list(loader.iter_epoch(0)),
        "val": list(classify.ClassificationLoader(val_ds, 8).iter_epoch(0)),
        "test": list(classify.ClassificationLoader(test_ds, 8).iter_epoch(0)),
    }
    settings = {
        "init": f"pretrained: {args.init_from}"
        if args.init_from
        else "random: the book's GPTModel under torch.manual_seed(123)",
        "model": {
            k: getattr(cfg, k)
            for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")
        },
        "epochs": args.epochs,
        "steps_per_epoch": len(plan["epochs"][0]),
        "batch_size": 8,
        "max_length": train_ds.max_length,
        "eval_freq": args.eval_freq,
        "eval_iter": args.eval_iter,
        "train_acc_batches": args.train_acc_batches,
        "examples": [len(train_ds), len(val_ds), len(test_ds)],
    }
    print(json.dumps(settings), flush=True)
    results = {"settings": settings}
    for name, fn, fn_args in (
        ("jaxgpt", _run_jaxgpt, (cfg, params, plan, args)),
        ("book", _run_book, (model, plan, args)),
    ):
        out = _timed(fn, *fn_args)
        results[name] = out
        acc = out["accuracy"]
        print(
            f"{name:<7} train {acc[0]:.2%}  validation {acc[1]:.2%}  test {acc[2]:.2%}  "
            f"losses {[[round(v, 3) for v in pair] for pair in out['losses']]}  "
            f"{out['wall_s']:.0f} s wall, {out['cpu_s']:.0f} s CPU",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(PROG, main)
