"""A chat page and its streaming HTTP API, served by the standard library (no web framework).

    GET  /             the chat page: one self-contained HTML file (inline CSS and JS, nothing fetched)
    GET  /api/health   {"status": "ok", "model", "prompt_style", "context_length", "max_new_tokens"}
    POST /api/chat     {"messages": [{"role": "user", "content": "..."}, ...]} or {"prompt": "..."}

A chat request may also set ``max_new_tokens`` (up to the server's), ``temperature``, ``top_k``,
``top_p`` and ``seed``. The reply streams as newline-delimited JSON (``application/x-ndjson``),
one object a line: ``{"text": piece}`` as tokens are decoded, then ``{"done": true, "reply",
"tokens", "stop", "prompt_tokens", "dropped_messages", "cut"}``; a failure while generating ends
the stream with ``{"error": ...}``. A bad request is answered 400 with ``{"error": ...}`` naming
what is wrong, before any model work. One lock serializes the model calls; a reader who goes
away stops the decode at its next token.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jaxgpt.chat import ChatModel, check_messages

MAX_BODY = 256 * 1024  # bytes a chat request may have
PAGE = Path(__file__).with_name("chat_page.html")


class BadRequest(ValueError):
    """A request the server answers with 400 and this message."""


def _number(body: dict, name: str, kind: type, low: float, high: float | None = None) -> Any:
    value = body[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (kind is float or float(value).is_integer())
    if not ok or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        noun = "an integer" if kind is int else "a number"
        raise BadRequest(f"{name} must be {noun} {span}, got {json.dumps(value)}")
    return kind(value)


def parse_chat_request(body: Any, chat: ChatModel) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """A decoded /api/chat body -> (checked messages, settings); BadRequest names the first fault."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with messages or prompt")
    allowed = {"messages", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(
            f"unknown fields: {', '.join(sorted(unknown))}; expected {', '.join(sorted(allowed))}"
        )
    if ("messages" in body) == ("prompt" in body):
        raise BadRequest("give exactly one of messages (a conversation) or prompt (a single instruction)")
    if "prompt" in body:
        if not isinstance(body["prompt"], str) or not body["prompt"].strip():
            raise BadRequest("prompt must be a non-empty string")
        messages = [{"role": "user", "content": body["prompt"]}]
    else:
        try:
            messages = check_messages(body["messages"])
        except ValueError as e:
            raise BadRequest(str(e)) from None
    settings: dict[str, Any] = {}
    vocab = chat.cfg.vocab_size
    limits = {
        "max_new_tokens": (int, 1, chat.max_new_tokens),
        "temperature": (float, 0.0, None),
        "top_k": (int, 1, vocab),
        "top_p": (float, 0.0, 1.0),
        "seed": (int, 0, 2**32 - 1),
    }
    for name, (kind, low, high) in limits.items():
        if name in body and body[name] is not None:
            settings[name] = _number(body, name, kind, low, high)
    if settings.get("top_p") == 0.0:
        raise BadRequest("top_p must be in (0, 1], got 0")
    return messages, settings


class ChatServer(ThreadingHTTPServer):
    """A threading HTTP server around one :class:`ChatModel`; ``lock`` serializes the model calls."""

    daemon_threads = True

    def __init__(
        self, chat: ChatModel | None, model_name: str, host: str = "127.0.0.1", port: int = 0, log=None
    ):
        self.chat, self.model_name, self.log = chat, model_name, log
        self.lock = threading.Lock()
        super().__init__((host, port), ChatHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class ChatHandler(BaseHTTPRequestHandler):
    """The three routes; replies stream over HTTP/1.0, ending when the connection closes."""

    server: ChatServer
    server_version = "jaxgpt-chat"
    timeout = 60  # seconds a socket read or write may wait: a stalled client frees its thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.server.log is not None:
            print(f"{self.address_string()} {format % args}", file=self.server.log, flush=True)

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            data = PAGE.read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif path == "/api/health":
            chat = self.server.chat
            self._send_json(
                HTTPStatus.OK,
                {
                    "status": "ok",
                    "model": self.server.model_name,
                    "prompt_style": chat.prompt_style,
                    "context_length": chat.cfg.context_length,
                    "max_new_tokens": chat.max_new_tokens,
                },
            )
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def _read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(f"Content-Length must be an integer, got {length!r}") from None
        if n < 0 or n > MAX_BODY:
            raise BadRequest(f"the body is {n} bytes; at most {MAX_BODY} are accepted")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path != "/api/chat":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {path}"})
            return
        try:
            messages, settings = parse_chat_request(self._read_body(), self.server.chat)
        except BadRequest as e:
            self.close_connection = True  # an unread oversize body must not be taken for a request
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            return
        with self.server.lock:
            self._stream_reply(messages, settings, turn=len(messages) // 2)  # as the terminal numbers them

    def _stream_reply(self, messages: list[dict[str, str]], settings: dict[str, Any], turn: int) -> None:
        reply = self.server.chat.reply(messages, turn=turn, **settings)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.flush()

        def line(obj: dict[str, Any]) -> None:
            self.wfile.write(json.dumps(obj).encode() + b"\n")
            self.wfile.flush()

        pieces = iter(reply)
        try:
            for piece in pieces:
                line({"text": piece})
        except (BrokenPipeError, ConnectionResetError):
            pieces.close()  # the reader left: stop the decode
            return
        except Exception as e:  # a failure during generation ends the stream with its message
            first_line = (str(e).strip().splitlines() or [""])[0]
            line({"error": f"generation failed ({type(e).__name__}: {first_line})"})
            return
        try:
            line(
                {
                    "done": True,
                    "reply": reply.text.strip(),
                    "tokens": reply.n_tokens,
                    "stop": reply.stop,
                    "prompt_tokens": reply.prompt_tokens,
                    "dropped_messages": reply.dropped_messages,
                    "cut": reply.cut,
                }
            )
        except (BrokenPipeError, ConnectionResetError):
            pass


def make_server(
    chat: ChatModel | None, model_name: str, host: str = "127.0.0.1", port: int = 0, log=sys.stderr
) -> ChatServer:
    """A :class:`ChatServer` bound to ``host:port`` (0 picks a free port; see ``.url``), not yet
    serving; ``chat`` may be set later, before ``serve_forever`` (a CLI binds before it loads)."""
    return ChatServer(chat, model_name, host, port, log)
