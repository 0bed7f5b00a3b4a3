"""Streaming chat: tokens as generate makes them, the conversation prompt, the HTTP API, the terminal
loop and the page in a headless browser, all on a tiny random model with GPT-2's vocabulary."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from scripts_loader import load_script

from jaxgpt import chat as chat_lib
from jaxgpt.chat import (
    ChatModel,
    check_messages,
    conversation_text,
    stream_text,
    stream_tokens,
    text_pieces,
)
from jaxgpt.chat_server import MAX_BODY, make_server
from jaxgpt.config import GPTConfig
from jaxgpt.generation import generate
from jaxgpt.model import init_params
from jaxgpt.tokenizer import EOT_ID, get_tokenizer
from jaxgpt.weights import save_hf_gpt2

ROOT = Path(__file__).resolve().parent.parent
# GPT-2's vocabulary so that any text tokenizes into it; a context that holds an Alpaca prompt.
CFG = GPTConfig(
    vocab_size=50257, context_length=96, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True
)
N_NEW = 6
ALPACA_HELLO = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\nSay hello\n\n### Response:\n"
)  # the book's format_input + "\n\n### Response:\n", written out by hand

chat_cli = load_script("chat")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def model(params):
    return ChatModel(params, CFG, max_new_tokens=N_NEW)


# Every decode shape compiles anew (twice: with and without the streaming callback), so the tests
# share a few prompts, one reply length and one end-of-text id, and remember generate's answers.
_GENERATED: dict = {}


def _generated(params, ids, n, eos_id=EOT_ID, **sampling):
    """generate's new tokens for one prompt, cut before the first ``eos_id``."""
    key = (tuple(ids), n, eos_id, tuple(sorted((k, str(v)) for k, v in sampling.items())))
    if key not in _GENERATED:
        out = generate(params, CFG, np.asarray([ids], np.int32), n, eos_id=eos_id, **sampling)
        new = np.asarray(out)[0, len(ids) :].tolist()
        _GENERATED[key] = new[: new.index(eos_id)] if eos_id in new else new
    return _GENERATED[key]


def _expected_reply(params, text):
    """The text of generate's greedy reply to the prompt ``text``."""
    tokenizer = get_tokenizer()
    return tokenizer.decode(_generated(params, tokenizer.encode(text), N_NEW))


# --- streaming = generate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bucket, sampling",
    [(64, {}), (None, {"temperature": 1.3, "top_k": 50, "key": jax.random.key(7)})],
    ids=["greedy-padded", "sampled"],
)
def test_streamed_tokens_are_generates_tokens(params, bucket, sampling):
    """Greedy, the prompt is padded to a bucket (32 -> 64 tokens): padding is hidden from the model."""
    ids = get_tokenizer().encode(ALPACA_HELLO)
    streamed = list(stream_tokens(params, CFG, ids, N_NEW, bucket=bucket, **sampling))
    assert streamed == _generated(params, ids, N_NEW, **sampling)
    assert len(streamed) == N_NEW  # the premise of the next tests: no end-of-text in these replies


def test_stream_text_is_the_decoded_stream(params):
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(ALPACA_HELLO)
    pieces = list(stream_text(params, CFG, ids, N_NEW, tokenizer=tokenizer))
    assert "".join(pieces) == tokenizer.decode(_generated(params, ids, N_NEW)) and all(pieces)


def test_stream_stops_before_end_of_text(params):
    ids = get_tokenizer().encode(ALPACA_HELLO)
    free = _generated(params, ids, N_NEW)
    eos = free[2]  # pretend the third token ends the text
    assert list(stream_tokens(params, CFG, ids, N_NEW, eos_id=eos)) == free[: free.index(eos)]


def test_stream_stops_when_the_context_is_full(params):
    ids = list(range(1000, 1000 + CFG.context_length - N_NEW))  # room for N_NEW tokens
    streamed = list(stream_tokens(params, CFG, ids, N_NEW + 4))
    assert streamed == _generated(params, ids, N_NEW)


def test_a_stream_closed_early_stops_its_decode_and_frees_the_model(params, monkeypatch):
    sinks = []

    class RecordingSink(chat_lib._Sink):
        def __init__(self):
            super().__init__()
            sinks.append(self)

    monkeypatch.setattr(chat_lib, "_Sink", RecordingSink)
    ids = get_tokenizer().encode(ALPACA_HELLO)
    stream = stream_tokens(params, CFG, ids, N_NEW)
    first = next(stream)
    stream.close()  # the decode is cancelled from its callback
    assert first == _generated(params, ids, N_NEW)[0]
    # The token read and at most one waiting were handed over; the decode stopped at the next.
    assert sinks[0].produced <= 2 < N_NEW
    assert list(stream_tokens(params, CFG, ids, N_NEW)) == _generated(params, ids, N_NEW)


def test_bad_stream_arguments_fail_before_any_work(params):
    with pytest.raises(ValueError, match="key is required"):
        stream_tokens(params, CFG, [1, 2], 3, temperature=1.0)
    with pytest.raises(ValueError, match="token ids outside"):
        stream_tokens(params, CFG, [CFG.vocab_size], 3)
    with pytest.raises(ValueError, match="top_k"):
        stream_tokens(params, CFG, [1, 2], 3, top_k=0, temperature=1.0, key=jax.random.key(0))


def test_text_pieces_hold_back_a_character_split_across_tokens():
    tokenizer = get_tokenizer()
    ids = tokenizer.encode("🙂 é and more")
    first = tokenizer.decode_single_token_bytes(ids[0])
    with pytest.raises(UnicodeDecodeError):
        first.decode("utf-8")  # the premise: the emoji's first token is not text on its own
    pieces = list(text_pieces(iter(ids), tokenizer))
    assert "".join(pieces) == "🙂 é and more"
    assert pieces[0] == "🙂" and all("\ufffd" not in p and p for p in pieces)
    assert list(text_pieces(iter(ids[:1]), tokenizer)) == ["\ufffd"]  # a dangling half at the end


# --- the conversation prompt -----------------------------------------------------------------------


def test_one_message_is_the_books_alpaca_prompt():
    assert conversation_text([{"role": "user", "content": "Say hello"}]) == ALPACA_HELLO


def test_earlier_exchanges_come_first_separated_by_a_blank_line():
    messages = [
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Say hello"},
    ]
    assert conversation_text(messages) == ALPACA_HELLO + "Hello." + "\n\n" + ALPACA_HELLO
    phi3 = conversation_text(messages, "phi3")
    assert phi3 == "<|user|>\nSay hello\n<|assistant|>:\nHello.\n\n<|user|>\nSay hello\n<|assistant|>:\n"


@pytest.mark.parametrize(
    "messages, fault",
    [
        ([], "non-empty list"),
        ([{"role": "assistant", "content": "hi"}], r"messages\[0\].role must be 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"messages\[1\].role"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "user", "content": "  "}], "is empty"),
        ([{"role": "user", "content": "a", "name": "x"}], "unknown fields: name"),
    ],
)
def test_bad_conversations_are_named(messages, fault):
    with pytest.raises(ValueError, match=fault):
        check_messages(messages)


def test_the_oldest_exchanges_are_dropped_to_fit_the_context(model):
    tokenizer = get_tokenizer()
    old = {"role": "user", "content": "word " * 40}
    messages = [old, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Say hello"}]
    budget = CFG.context_length - N_NEW
    assert len(tokenizer.encode(conversation_text(messages))) > budget  # the premise
    reply = model.reply(messages)
    assert (reply.dropped_messages, reply.cut, reply.truncated) == (2, False, True)
    assert reply.prompt_tokens == len(tokenizer.encode(ALPACA_HELLO))
    long = model.reply([{"role": "user", "content": "word " * 200}])
    assert long.cut and long.prompt_tokens == budget  # neither reply is run: no decode needed


# --- the HTTP API ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model):
    srv = make_server(model, "tiny", port=0, log=None)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(server, method, path, body=None, raw=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_chat_api_streams_the_reply_as_json_lines(server, params):
    conn, resp = _request(server, "POST", "/api/chat", {"prompt": "Say hello"})
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/x-ndjson"
    events = [json.loads(line) for line in resp]  # one JSON object per line until the stream closes
    conn.close()
    pieces = [e["text"] for e in events[:-1]]
    done = events[-1]
    assert len(pieces) >= 1 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == _expected_reply(params, ALPACA_HELLO)
    assert done["done"] and done["reply"] == "".join(pieces).strip()
    assert done["tokens"] == N_NEW and done["stop"] == "max_new_tokens"
    assert done["prompt_tokens"] == len(get_tokenizer().encode(ALPACA_HELLO))


def test_chat_api_takes_a_conversation(server, params):
    first = _expected_reply(params, ALPACA_HELLO).strip()
    messages = [
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Say hello"},
    ]
    conn, resp = _request(server, "POST", "/api/chat", {"messages": messages})
    events = [json.loads(line) for line in resp]
    conn.close()
    expected = _expected_reply(params, ALPACA_HELLO + first + "\n\n" + ALPACA_HELLO)
    assert "".join(e.get("text", "") for e in events) == expected
    assert events[-1]["done"] and events[-1]["dropped_messages"] == 0


@pytest.mark.parametrize(
    "raw, fault",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "exactly one of messages"),
        (b'{"messages": "hi"}', "messages must be a non-empty list"),
        (b'{"prompt": "a", "messages": []}', "exactly one of messages"),
        (b'{"prompt": ""}', "prompt must be a non-empty string"),
        (b'{"messages": [{"role": "bot", "content": "x"}]}', r"messages\[0\].role"),
        (b'{"prompt": "a", "temperature": -1}', "temperature must be"),
        (b'{"prompt": "a", "max_new_tokens": 100000}', "max_new_tokens must be"),
        (b'{"prompt": "a", "colour": "red"}', "unknown fields: colour"),
        (b'{"prompt": "' + b"x" * (MAX_BODY + 1) + b'"}', f"at most {MAX_BODY} are accepted"),
    ],
)
def test_bad_chat_requests_get_400_naming_the_fault(server, raw, fault):
    conn, resp = _request(server, "POST", "/api/chat", raw=raw)
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 400 and re.search(fault, body["error"]), body


def test_health_and_page(server):
    conn, resp = _request(server, "GET", "/api/health")
    health = json.loads(resp.read())
    conn.close()
    assert health == {
        "status": "ok", "model": "tiny", "prompt_style": "alpaca",
        "context_length": CFG.context_length, "max_new_tokens": N_NEW,
    }  # fmt: skip
    conn, resp = _request(server, "GET", "/")
    page = resp.read().decode()
    conn.close()
    assert resp.status == 200 and "/api/chat" in page and "<script" in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    conn, resp = _request(server, "GET", "/nowhere")
    assert resp.status == 404 and "error" in json.loads(resp.read())
    conn.close()


# --- scripts/chat.py -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, params):
    path = tmp_path_factory.mktemp("models") / "hf"
    save_hf_gpt2(CFG, params, path)
    return path


def test_terminal_conversation_streams_replies_and_resets(hf_dir, params, capsys):
    stdin = io.StringIO("Say hello\n\n/reset\nSay hello\n/quit\nnever read\n")
    stdout = io.StringIO()
    code = chat_cli.main([str(hf_dir), "--max-new-tokens", str(N_NEW)], stdin=stdin, stdout=stdout)
    assert code == 0
    reply = _expected_reply(params, ALPACA_HELLO)
    # /reset forgets the first exchange, so the second reply answers the same prompt.
    expected = f"You: Model: {reply}\nYou: You: (a new conversation)\nYou: Model: {reply}\nYou: "
    assert stdout.getvalue() == expected
    assert "never read" not in stdout.getvalue()


def test_terminal_conversation_ends_at_end_of_input(hf_dir, params):
    stdout = io.StringIO()
    stdin = io.StringIO("Say hello\nSay hello")  # the second exchange follows the first in its prompt
    assert chat_cli.main([str(hf_dir), "--max-new-tokens", str(N_NEW)], stdin=stdin, stdout=stdout) == 0
    first = _expected_reply(params, ALPACA_HELLO)
    second_prompt = ALPACA_HELLO + first.strip() + "\n\n" + ALPACA_HELLO
    second = _expected_reply(params, second_prompt)
    assert stdout.getvalue() == f"You: Model: {first}\nYou: Model: {second}\nYou: \n"


@pytest.mark.parametrize(
    "argv, fault",
    [
        (["{missing}"], "missing does not exist"),
        (["{hf}", "--temperature", "-1"], "argument --temperature: expected a finite number >= 0.0"),
        (["{hf}", "--port", "70000"], "argument --port: expected an integer in [0, 65535]"),
        (["{hf}", "--prompt-style", "chatml"], "argument --prompt-style: invalid choice: 'chatml'"),
        (["{hf}", "--top-k", "60000"], "--top-k 60000 exceeds the model's vocabulary of 50257"),
    ],
)
def test_bad_input_exits_2_with_one_line(hf_dir, tmp_path, capsys, argv, fault):
    argv = [a.format(hf=hf_dir, missing=tmp_path / "missing") for a in argv]
    try:
        code = chat_cli.main(argv, stdin=io.StringIO(""), stdout=io.StringIO())
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("chat.py: ")
    assert fault in err


def test_a_port_in_use_exits_2(hf_dir, server, capsys):
    port = server.server_address[1]
    code = chat_cli.main(
        [str(hf_dir), "--web", "--port", str(port)], stdin=io.StringIO(""), stdout=io.StringIO()
    )
    err = capsys.readouterr().err
    assert code == 2 and f"--port {port}" in err and len(err.strip().splitlines()) == 1


def test_web_serves_on_the_printed_url_until_ctrl_c(hf_dir):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "chat.py"), str(hf_dir), "--web", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAXGPT_NO_COMPILE_CACHE": "1"},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:(\d+)/) ", line)
        assert url and url.group(2) != "0", line
        conn = http.client.HTTPConnection("127.0.0.1", int(url.group(2)), timeout=60)
        conn.request("GET", "/api/health")
        assert json.loads(conn.getresponse().read())["context_length"] == CFG.context_length
        conn.close()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "chat.py: interrupted (Ctrl-C)"


# --- the page in a real browser --------------------------------------------------------------------


def _browser():
    """Headless Chromium driven by Selenium, or a skip saying what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    binary = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(binary)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


class _GatedReply:
    """A reply that holds its second piece back until ``gate`` is set."""

    def __init__(self, reply, gate):
        self._reply, self._gate = reply, gate

    def __iter__(self):
        for i, piece in enumerate(self._reply):
            if i == 1:
                assert self._gate.wait(60)
            yield piece

    def __getattr__(self, name):
        return getattr(self._reply, name)


def test_the_page_streams_replies_in_headless_chromium(server, model, params, monkeypatch):
    """Type, click Send, see the first piece of the reply while the rest is held back, then the
    whole reply; a second message carries the first exchange; Reset clears the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gate, reply = threading.Event(), model.reply
    monkeypatch.setattr(model, "reply", lambda *a, **k: _GatedReply(reply(*a, **k), gate))

    def state(b):
        return b.find_element(By.TAG_NAME, "body").get_attribute("data-state")

    def shown(b):  # the first reply's text so far
        return b.execute_script("return document.querySelector('.assistant').textContent")

    def send(text):
        browser.find_element(By.ID, "input").send_keys(text)
        browser.find_element(By.ID, "send").click()  # the page is "streaming" from here
        wait.until(lambda b: state(b) == "idle")
        return browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1]

    browser = _browser()  # or a skip
    try:
        first = _expected_reply(params, ALPACA_HELLO)
        first_piece = next(text_pieces(_generated(params, get_tokenizer().encode(ALPACA_HELLO), N_NEW)))
        second = _expected_reply(params, ALPACA_HELLO + first.strip() + "\n\n" + ALPACA_HELLO)
        browser.get(server.url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "tiny" in b.find_element(By.ID, "model").text)  # /api/health answered
        browser.find_element(By.ID, "input").send_keys("Say hello")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: shown(b) == first_piece)  # shown while the rest is held back
        assert state(browser) == "streaming" and first_piece != first
        gate.set()
        wait.until(lambda b: state(b) == "idle")
        bubble = browser.find_element(By.CSS_SELECTOR, ".assistant")
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Say hello"
        assert bubble.get_property("textContent") == first
        assert int(bubble.get_attribute("data-pieces")) > 1  # the reply arrived piece by piece
        assert send("Say hello").get_property("textContent") == second
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    finally:
        gate.set()  # never leave the server holding a reply back
        browser.quit()
