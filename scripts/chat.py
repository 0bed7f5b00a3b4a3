"""Chat with an instruction-tuned model in the terminal or in a web page, the reply streamed as it is decoded.

    python scripts/chat.py runs/instruct/                       # a terminal conversation
    python scripts/chat.py runs/instruct/ --web --port 8000     # the chat page at http://127.0.0.1:8000/
    python scripts/chat.py out/hf --prompt-style phi3 --temperature 0.7 --top-k 40 --seed 1

The model is anything ``jaxgpt.load`` reads: a training run or step directory, a Hugging Face
GPT-2 directory, the book's ``.pth`` state dict, the book's OpenAI download (gpt2/124M), or a GPT-2
name. Each message is put in the book's chapter 7 instruction format (``--prompt-style alpaca``,
or ``phi3``) after the earlier exchanges; when they no longer fit in the context with room for
the reply, the oldest are dropped and a note says so. Replies are greedy by default, as the book's
chapter 7 generates them; ``--temperature`` above 0 samples, seeded by ``--seed``.

In the terminal, ``/reset`` starts a new conversation and ``/quit`` (or end of input, Ctrl-D)
leaves. ``--web`` serves the chat page and its API instead (see ``jaxgpt/chat_server.py``: POST
/api/chat streams newline-delimited JSON), on 127.0.0.1 unless ``--host`` says otherwise; ``--port
0`` picks a free port. The URL is printed.

Exit codes: 0 done; 2 bad input (a missing or incompatible model, a bad option, a port that
cannot be bound), said in one line before any work; 1 a failure during generation; 130
interrupted (Ctrl-C).
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
    run_cli,
    use_compilation_cache,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

PROG = "chat.py"


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__, HintParser)
    p.add_argument(
        "model",
        help="training run or step directory, Hugging Face directory, book .pth file, the book's OpenAI "
        "download (gpt2/124M) or a GPT-2 name (gpt2, gpt2-medium, ...)",
    )
    p.add_argument("--web", action="store_true", help="serve the chat page instead of the terminal loop")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on with --web (default: %(default)s)"
    )
    p.add_argument(
        "--port",
        type=number(int, 0, 65535),
        default=8000,
        help="port for --web, 0 = any free (default: %(default)s)",
    )
    p.add_argument(
        "--prompt-style",
        choices=["alpaca", "phi3"],
        default="alpaca",
        help="instruction format (default: %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=number(int, 1),
        default=256,
        help="most tokens per reply (default: %(default)s)",
    )
    add_sampling_args(p, 0.0, "sample only among the k most likely tokens")
    p.add_argument(
        "--n-heads", type=number(int, 1), help="attention heads of a book .pth whose width matches no preset"
    )
    return p


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _terminal(chat, stdin, stdout) -> int:
    """The conversation loop: read a line, stream the reply, remember both."""
    history: list[dict[str, str]] = []
    print("Type a message; /reset starts over, /quit leaves.", file=sys.stderr, flush=True)
    while True:
        stdout.write("You: ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return 0
        if text == "/reset":
            history = []
            print("(a new conversation)", file=stdout, flush=True)
            continue
        messages = history + [{"role": "user", "content": text}]
        reply = chat.reply(messages, turn=len(history) // 2)
        if reply.truncated:
            print("(earlier parts of the conversation were left out to fit the context)", file=stdout)
        stdout.write("Model: ")
        stdout.flush()
        try:
            for piece in reply:
                stdout.write(piece)
                stdout.flush()
        except Exception as e:  # the settings were checked: what fails now fails during the work
            first_line = (str(e).strip().splitlines() or [""])[0]
            stdout.write("\n")
            return _fail(f"generation failed ({type(e).__name__}: {first_line})", 1)
        stdout.write("\n")
        stdout.flush()
        history = messages + [{"role": "assistant", "content": reply.text.strip()}]


def _serve(server, chat, args: argparse.Namespace) -> int:
    server.chat = chat
    print(f"Serving {args.model} at {server.url} (Ctrl-C stops)", flush=True)
    server.serve_forever()
    return 0


def _run(args: argparse.Namespace, stdin, stdout) -> int:
    from jaxgpt.chat_server import make_server

    server = None
    if args.web:  # bind first: a port in use is bad input, found before the model loads
        try:
            server = make_server(None, args.model, args.host, args.port)
        except OSError as e:  # address in use, unknown host, no permission
            return _fail(f"cannot serve on --host {args.host} --port {args.port}: {e.strerror or e}", 2)
    try:
        chat = _load_chat(args)
        if isinstance(chat, int):  # the exit code of bad input
            return chat
        return _serve(server, chat, args) if server is not None else _terminal(chat, stdin, stdout)
    finally:
        if server is not None:
            server.server_close()


def _load_chat(args: argparse.Namespace):
    """The model of ``args`` as a ChatModel, or exit code 2 after one line saying what is wrong."""
    import jaxgpt
    from jaxgpt.chat import ChatModel
    from jaxgpt.tokenizer import EOT_ID

    try:
        cfg, params = jaxgpt.load(args.model, n_heads=args.n_heads)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _fail(str(e), 2)
    if cfg.vocab_size <= EOT_ID:
        return _fail(
            f"{args.model} has a vocabulary of {cfg.vocab_size} tokens, fewer than the GPT-2 tokenizer's: "
            "the model does not fit GPT-2 BPE text",
            2,
        )
    if args.top_k is not None and args.top_k > cfg.vocab_size:
        return _fail(f"--top-k {args.top_k} exceeds the model's vocabulary of {cfg.vocab_size} tokens", 2)
    return ChatModel(
        params,
        cfg,
        prompt_style=args.prompt_style,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def main(argv: list[str] | None = None, stdin=None, stdout=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args, stdin or sys.stdin, stdout or sys.stdout)
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C)", 130)


if __name__ == "__main__":
    exit_on_interrupt(PROG, lead="\n")
    use_compilation_cache()  # each prompt length compiles once, then loads from disk
    run_cli(PROG, main)
