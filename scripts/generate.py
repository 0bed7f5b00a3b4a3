"""Generate text from a trained model (the book's 5.3): greedy, or sampled with temperature, top-k, top-p.

    python scripts/generate.py runs/quickstart-.../ --prompt "Every effort moves you"
    python scripts/generate.py out/hf --temperature 1.4 --top-k 25 --seed 123 --stream
    python scripts/generate.py model.pth --max-new-tokens 30          # the book's GPTModel weights

The model is a training run directory of ``scripts/train.py`` (its latest checkpoint) or one of
its step directories, a Hugging Face GPT-2 directory (config.json + model.safetensors), or a
book ``.pth`` state dict (see scripts/convert.py). The prompt and its continuation are printed;
with ``--stream`` each token is printed as soon as it is produced (the whole decode is still one
compiled program). Generation stops at <|endoftext|> unless ``--ignore-eos``.

Exit codes: 0 done, 2 bad input (missing or incompatible model, bad option). The compiled decode
is kept in JAX's persistent cache (~/.cache/jaxgpt/xla, or $JAX_COMPILATION_CACHE_DIR), so the next
call with the same shapes starts at once; JAXGPT_NO_COMPILE_CACHE=1 turns it off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "scripts"):  # run from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from convert import ModelLoadError, load_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="training run or step directory, Hugging Face directory, or book .pth file")
    p.add_argument("--prompt", default="Every effort moves you", help="start context (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (default: 0)")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, help="sample only from the nucleus of this probability mass, in (0, 1]"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling key (default: %(default)s)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--n-heads", type=int, help="attention heads of a book .pth whose width matches no preset")
    return p


class _Streamer:
    """Prints each row-0 token as it arrives; holds back bytes until they form whole UTF-8 characters."""

    def __init__(self, tokenizer, eos_id: int | None) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.pending, self.stopped = b"", False

    def __call__(self, t, tokens) -> None:
        token = int(tokens[0])
        if self.stopped or token == self.eos_id:
            self.stopped = True
            return
        self.pending += self.tokenizer.decode_single_token_bytes(token)
        try:
            text, self.pending = self.pending.decode("utf-8"), b""
        except UnicodeDecodeError as e:  # a character split across tokens: print what is whole
            text, self.pending = self.pending[: e.start].decode("utf-8"), self.pending[e.start :]
        print(text, end="", flush=True)

    def finish(self) -> None:
        print(self.pending.decode("utf-8", errors="replace"), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import jax

    from jaxgpt.generation import generate_ragged
    from jaxgpt.tokenizer import EOT_ID, get_tokenizer

    try:
        cfg, params, _ = load_model(args.model, args.n_heads)
    except ModelLoadError as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 2
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"})
    if not prompt:
        print("generate.py: --prompt is empty; give at least one token of text", file=sys.stderr)
        return 2
    if max(prompt) >= cfg.vocab_size:
        print(
            f"generate.py: the model's vocabulary has {cfg.vocab_size} tokens, fewer than the GPT-2 "
            f"tokenizer's; this prompt uses token {max(prompt)}: the model does not fit GPT-2 BPE text.",
            file=sys.stderr,
        )
        return 2
    eos_id = None if args.ignore_eos or EOT_ID >= cfg.vocab_size else EOT_ID
    streamer = _Streamer(tokenizer, eos_id) if args.stream else None
    if streamer is not None:
        print(args.prompt, end="", flush=True)
    try:
        out = generate_ragged(
            params,
            cfg,
            [prompt],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=eos_id,
            key=jax.random.key(args.seed) if args.temperature > 0 else None,
            callback=streamer,
        )
    except ValueError as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 2
    if streamer is not None:
        streamer.finish()
    else:
        print(tokenizer.decode(out[0]))
    return 0


if __name__ == "__main__":
    try:
        from jaxgpt.xla import enable_compilation_cache
    except ImportError:
        pass
    else:
        enable_compilation_cache()  # the decode loop compiles once per shape, then loads from disk
    sys.exit(main())
