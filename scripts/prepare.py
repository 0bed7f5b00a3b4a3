"""Tokenize a corpus into uint16 token shards for training on data larger than memory.

    python scripts/prepare.py corpus.txt data/corpus            # one file
    python scripts/prepare.py books/ data/books --workers 8     # every .txt under a directory
    python scripts/train.py --data data/books ...               # train by streaming the shards

Interrupted? Run the same command again: finished shards are kept. See ``jaxgpt.shards``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxgpt.shards import DEFAULT_CHUNK_BYTES, prepare_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", help="text files and/or directories of .txt files (UTF-8)")
    parser.add_argument("out_dir", help="directory for the shards and manifest.json (created if missing)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    parser.add_argument(
        "--chunk-mb",
        type=float,
        default=DEFAULT_CHUNK_BYTES / 2**20,
        help="approximate text per shard in MiB (default %(default)s; one process tokenizes one chunk)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a different dataset already in out_dir"
    )
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be a positive integer, got {args.workers}")
    if args.chunk_mb <= 0:
        parser.error(f"--chunk-mb must be positive, got {args.chunk_mb}")
    try:
        manifest = prepare_shards(
            args.inputs,
            args.out_dir,
            num_workers=args.workers,
            chunk_bytes=max(int(args.chunk_mb * 2**20), 1),
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n_tokens, n_shards, n_files = manifest["total_tokens"], len(manifest["shards"]), len(manifest["sources"])
    print(f"{n_tokens:,} tokens in {n_shards} shard(s) from {n_files} file(s) in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
