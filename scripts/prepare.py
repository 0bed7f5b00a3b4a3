"""Tokenize a corpus into uint16 token shards for training on data larger than memory.

    python scripts/prepare.py corpus.txt data/corpus            # one file
    python scripts/prepare.py books/ data/books --workers 8     # every .txt under a directory
    python scripts/train.py --data data/books ...               # train by streaming the shards

Interrupted? Run the same command again: finished shards are kept. A run that failed on its
input (a file that is not UTF-8, say) leaves nothing behind, and an unfinished attempt whose
inputs have changed since is started again. See ``jaxgpt.shards``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxgpt.shards import DEFAULT_CHUNK_BYTES, prepare_shards  # noqa: E402

EXIT_CODES = (
    "exit codes: 0 done, 2 bad input (one line naming the flag or file, nothing written), "
    "1 a failure while writing the shards, 130 interrupted (Ctrl-C; run again to resume)"
)
# Errors that say the input or the destination is wrong, before or during the work.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    if not text.strip().lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _positive_mib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prepare.py",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="text files and/or directories of .txt files (UTF-8)")
    parser.add_argument("out_dir", help="directory for the shards and manifest.json (created if missing)")
    parser.add_argument(
        "--workers", type=_positive_int, default=None, help="tokenizer processes (default: CPU count)"
    )
    parser.add_argument(
        "--chunk-mb",
        type=_positive_mib,
        default=DEFAULT_CHUNK_BYTES / 2**20,
        help="approximate text per shard in MiB (default %(default)s; one process tokenizes one chunk)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a different finished dataset already in out_dir"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = prepare_shards(
            args.inputs,
            args.out_dir,
            num_workers=args.workers,
            chunk_bytes=max(int(args.chunk_mb * 2**20), 1),
            overwrite=args.overwrite,
            progress=sys.stderr.isatty(),  # a bar in a terminal, not in a log
        )
    except KeyboardInterrupt:
        print(
            f"prepare.py: interrupted; run the same command again to resume {args.out_dir}", file=sys.stderr
        )
        return 130
    except BAD_INPUT as err:
        print(f"prepare.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk filled up, a file vanished...: finished shards are kept
        print(f"prepare.py: failed while writing {args.out_dir}: {err}", file=sys.stderr)
        return 1
    n_tokens, n_shards, n_files = manifest["total_tokens"], len(manifest["shards"]), len(manifest["sources"])
    print(f"{n_tokens:,} tokens in {n_shards} shard(s) from {n_files} file(s) in {args.out_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the work started
        print("prepare.py: interrupted", file=sys.stderr)
        sys.exit(130)
