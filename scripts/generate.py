"""Generate text from a trained model (the book's 5.3): sampled with temperature, top-k and top-p, or greedy.

    python scripts/generate.py runs/quickstart-.../ --prompt "Every effort moves you"
    python scripts/generate.py out/hf --temperature 1.4 --top-k 25 --seed 123 --stream
    python scripts/generate.py model.pth --temperature 0 --n-heads 12   # greedy, the book's GPTModel weights
    python scripts/generate.py gpt2 --prompt "Every effort moves you"   # OpenAI's GPT-2, by name

The model is anything ``jaxgpt.load`` reads: a training run directory of ``scripts/train.py`` (its
latest checkpoint) or one of its step directories, a Hugging Face GPT-2 directory (config.json +
model.safetensors), the book's ``.pth`` state dict (needs torch), the folder the book's
``gpt_download.py`` writes (gpt2/124M), or a GPT-2 name from the Hugging Face hub. By default it samples
(temperature 1, the 40 most likely tokens, seed 123), so even a small model shows text rather
than repeating its likeliest token; ``--temperature 0`` is greedy, as the book's
``generate_text_simple``. The prompt and its continuation are printed; with ``--stream`` each
token as soon as it is produced. Generation stops at <|endoftext|> unless ``--ignore-eos``.

Exit codes: 0 done; 2 bad input (a missing, damaged or incompatible model, a bad option), said in
one line before any work; 1 a failure during generation; 130 interrupted (Ctrl-C).

The compiled decode is kept in JAX's persistent cache (~/.cache/jaxgpt/xla, or
$JAX_COMPILATION_CACHE_DIR), so the next call with the same shapes starts at once;
JAXGPT_NO_COMPILE_CACHE=1 turns it off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# scripts/ is on sys.path when a script runs
from benchlib import (
    HintParser,
    add_sampling_args,
    doc_parser,
    exit_on_interrupt,
    number,
    use_compilation_cache,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

PROG = "generate.py"
DEFAULT_TOP_K = 40  # applied when sampling and no --top-k is given


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__, HintParser)
    p.add_argument(
        "model",
        help="training run or step directory, Hugging Face directory, book .pth file, the book's OpenAI "
        "download (gpt2/124M) or a GPT-2 name (gpt2, gpt2-medium, ...)",
    )
    p.add_argument("--prompt", default="Every effort moves you", help="start context (default: %(default)r)")
    p.add_argument(
        "--max-new-tokens", type=number(int, 0), default=50, help="tokens to generate (default: %(default)s)"
    )
    add_sampling_args(
        p, 1.0, f"sample only among the k most likely tokens (default when sampling: {DEFAULT_TOP_K})"
    )
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument(
        "--n-heads", type=number(int, 1), help="attention heads of a book .pth whose width matches no preset"
    )
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


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _generate(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import jaxgpt
    from jaxgpt.tokenizer import EOT_ID

    tokenizer = jaxgpt.get_tokenizer()
    prompt = tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"})
    if not prompt:
        return _fail("--prompt is empty; give at least one token of text", 2)
    try:
        cfg, params = jaxgpt.load(args.model, n_heads=args.n_heads)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _fail(str(e), 2)
    if reason := jaxgpt.not_a_language_model(params, args.model):
        return _fail(reason, 2)
    if max(prompt) >= cfg.vocab_size:
        return _fail(
            f"{args.model} has a vocabulary of {cfg.vocab_size} tokens, fewer than the GPT-2 tokenizer's; "
            f"--prompt uses token {max(prompt)}: the model does not fit GPT-2 BPE text",
            2,
        )
    top_k = args.top_k
    if top_k is None and args.temperature > 0:
        top_k = min(DEFAULT_TOP_K, cfg.vocab_size)
    elif top_k is not None and top_k > cfg.vocab_size:
        return _fail(f"--top-k {top_k} exceeds the model's vocabulary of {cfg.vocab_size} tokens", 2)
    eos_id = None if args.ignore_eos or EOT_ID >= cfg.vocab_size else EOT_ID

    streamer = _Streamer(tokenizer, eos_id) if args.stream else None
    if streamer is not None:
        print(args.prompt, end="", flush=True)
    try:
        out = jaxgpt.generate(
            params,
            cfg,
            jnp.asarray([prompt], jnp.int32),  # (1, T)
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=top_k,
            top_p=args.top_p,
            eos_id=eos_id,
            key=jax.random.key(args.seed) if args.temperature > 0 else None,
            callback=streamer,
        )  # (1, T + max_new_tokens); after eos_id a row repeats it
    except Exception as e:  # the options were checked above: what fails now fails during the work
        first_line = (str(e).strip().splitlines() or [""])[0]
        return _fail(f"generation failed ({type(e).__name__}: {first_line})", 1)
    if streamer is not None:
        streamer.finish()
        return 0
    ids = [int(t) for t in out[0]]
    new = ids[len(prompt) :]
    if eos_id in new:
        new = new[: new.index(eos_id)]
    print(tokenizer.decode(prompt + new))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C)", 130)


if __name__ == "__main__":
    exit_on_interrupt(PROG)
    use_compilation_cache()  # the decode loop compiles once per shape, then loads from disk
    sys.exit(main())
