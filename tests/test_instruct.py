"""The prompt formats against the book's chapter 7 code and its exercise 7.1 (Phi-3)."""

import http.server
import json
import re
import socket
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from book_reference import BOOK_CFG

from jaxgpt.config import GPTConfig
from jaxgpt.instruct import (
    InstructionDataError,
    InstructionDataset,
    InstructionLoader,
    JudgeError,
    bucket_length,
    check_judge,
    custom_collate_fn,
    extract_response,
    format_example,
    format_input,
    format_prompt,
    generate_model_scores,
    generate_responses,
    judge_endpoint,
    load_instruction_data,
    query_model,
    response_loss,
    scoring_prompt,
    split_data,
    write_json_atomic,
)
from jaxgpt.loss import calc_loss_loader, cross_entropy, linear_cross_entropy
from jaxgpt.model import GPTModel, init_params
from jaxgpt.tokenizer import get_tokenizer
from jaxgpt.train import TrainConfig, create_train_state, jit_train_step
from jaxgpt.weights import load_book_state_dict

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"


def _entries():
    if DATA.exists():
        return json.loads(DATA.read_text())[:50]
    return [
        {"instruction": "Name a prime number.", "input": "", "output": "7"},
        {"instruction": "Rewrite in passive voice.", "input": "The cat ate it.", "output": "It was eaten."},
    ]


def _tiny_cfg() -> GPTConfig:
    """A model that knows GPT-2's token ids but is small enough for a test."""
    return GPTConfig(vocab_size=50257, context_length=96, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def test_alpaca_prompt_is_the_books_format_input():
    ch07 = pytest.importorskip("llms_from_scratch.ch07", reason="needs the reference extra")
    for entry in _entries():
        assert format_input(entry) == ch07.format_input(entry)
        # The book's training text: format_input + "\n\n### Response:\n" + output.
        assert format_example(entry) == ch07.format_input(entry) + f"\n\n### Response:\n{entry['output']}"


def test_phi3_prompt_follows_the_books_exercise():
    entry = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert format_input(entry, "phi3") == "<|user|>\nAdd the numbers.\n2 and 3"
    assert format_example(entry, "phi3") == "<|user|>\nAdd the numbers.\n2 and 3\n<|assistant|>:\n5"
    no_input = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    assert format_prompt(no_input, "phi3") == "<|user|>\nSay hi.\n<|assistant|>:\n"


def test_extract_response_matches_the_books_slicing():
    entry = {"instruction": "Name a colour.", "input": ""}
    prompt = format_input(entry)
    generated = format_prompt(entry) + "Blue.\n\n### Response:\nRed."
    # The book: generated[len(prompt):].replace("### Response:", "").strip()
    expected = generated[len(prompt) :].replace("### Response:", "").strip()
    assert extract_response(generated) == expected
    assert extract_response(format_prompt(entry, "phi3") + " Green ", "phi3") == "Green"
    assert extract_response("  no marker  ") == "no marker"


def test_unknown_style_is_named():
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'.*alpaca, phi3"):
        format_input({"instruction": "x"}, "chatml")


# --------------------------------------------------------------------------------------------
# The data file (book 7.2)
# --------------------------------------------------------------------------------------------


def _write(tmp_path, content, name="data.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "the file is empty"),
        ("[]", "the list of entries is empty"),
        ('{"instruction": "x"}', "expected a JSON list of entries, got a dict"),
        ("[{]", "not valid JSON"),
        ([{"instruction": "a", "output": "b"}, {"output": "c"}], "entry 1 has no 'instruction' field"),
        ([{"instruction": "a", "input": ""}], "entry 0 has no 'output' field"),
        (
            [{"instruction": "a", "output": "b"}] * 2 + [{"instruction": "a", "output": 3}],
            "entry 2, field 'output' must be a string, got int",
        ),
        (
            [{"instruction": "a", "input": ["x"], "output": "b"}],
            "entry 0, field 'input' must be a string, got list",
        ),
        ([["instruction", "output"]], "entry 0 is a list, not an object"),
    ],
)
def test_bad_data_files_name_the_entry_and_field(tmp_path, content, expected):
    path = _write(tmp_path, content)
    with pytest.raises(InstructionDataError, match=re.escape(expected)) as e:
        load_instruction_data(path)
    assert str(path) in str(e.value) and isinstance(e.value, ValueError)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InstructionDataError, match="no such file"):
        load_instruction_data(tmp_path / "nothing.json")


def test_split_is_the_books_slices():
    data = list(range(1100))
    train, val, test = split_data(data)
    # The book: train_portion = int(1100 * 0.85) = 935, test_portion = int(1100 * 0.1) = 110, the
    # rest (55) validates; train = data[:935], test = data[935:1045], val = data[1045:].
    assert train == data[:935] and test == data[935:1045] and val == data[1045:]
    shuffled = split_data(data, seed=1)
    assert sorted(sum(shuffled, [])) == data and shuffled[0] != train
    assert split_data(data, seed=1) == shuffled


# --------------------------------------------------------------------------------------------
# Batches (book 7.3 and exercise 7.2)
# --------------------------------------------------------------------------------------------


def test_collate_of_the_books_example():
    # Book 7.3: inputs_1 = [0, 1, 2, 3, 4], inputs_2 = [5, 6], inputs_3 = [7, 8, 9]
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    P, X = 50256, -100
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]]
    assert targets.tolist() == [[1, 2, 3, 4, P], [6, P, X, X, X], [8, 9, P, X, X]]
    # allowed_max_length cuts after padding; instruction lengths ignore the prompt's targets
    inputs, targets = custom_collate_fn(
        [[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3, instruction_lengths=[3, 1]
    )
    assert inputs.tolist() == [[0, 1, 2], [5, 6, P]] and targets.tolist() == [[X, X, 3], [6, P, X]]
    # bucket padding: more positions and rows, all ignored
    inputs, targets = custom_collate_fn([[5, 6]], pad_to=4, pad_rows_to=2)
    assert inputs.tolist() == [[5, 6, P, P], [P, P, P, P]] and targets.tolist() == [
        [6, P, X, X],
        [X, X, X, X],
    ]


def _book_batches(ch07, torch, entries, batch_size, allowed_max_length, mask):
    """The book's InstructionDataset + custom_collate_fn (+ exercise 7.2's masking rule)."""
    tokenizer = get_tokenizer()
    dataset = ch07.InstructionDataset(entries, tokenizer)
    out = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        if mask:  # exercise 7.2: targets[:instruction_length - 1] = -100, before the cut
            x, y = ch07.custom_collate_fn(items)
            for row, i in enumerate(range(start, start + len(items))):
                y[row, : len(tokenizer.encode(ch07.format_input(entries[i]))) - 1] = -100
            if allowed_max_length is not None:
                x, y = x[:, :allowed_max_length], y[:, :allowed_max_length]
        else:
            x, y = ch07.custom_collate_fn(items, allowed_max_length=allowed_max_length)
        out.append((x.numpy(), y.numpy()))
    return out


@pytest.mark.parametrize(
    ("allowed_max_length", "mask"), [(None, False), (48, False), (None, True), (48, True)]
)
def test_batches_equal_the_books_instruction_dataset_and_collate(allowed_max_length, mask):
    ch07 = pytest.importorskip("llms_from_scratch.ch07", reason="needs the reference extra")
    torch = pytest.importorskip("torch")
    entries = _entries()[:20]
    book = _book_batches(ch07, torch, entries, 8, allowed_max_length, mask)
    dataset = InstructionDataset.from_entries(entries)
    loader = InstructionLoader(
        dataset, batch_size=8, allowed_max_length=allowed_max_length, mask_instructions=mask, bucket=None
    )
    ours = list(loader.iter_epoch(0))
    assert len(ours) == len(book)
    for i, ((x, y), (bx, by)) in enumerate(zip(ours, book, strict=True)):
        assert x.shape == bx.shape, f"batch {i}: {x.shape} vs the book's {bx.shape}"
        assert np.array_equal(x, bx), f"batch {i}: inputs differ"
        assert np.array_equal(y, by), f"batch {i}: targets differ at {np.argwhere(y != by)[:5].tolist()}"
        assert np.array_equal(y == -100, by == -100)


def test_bucketing_keeps_the_loss_and_bounds_the_compiled_shapes():
    cfg = _tiny_cfg()
    params = init_params(cfg, jax.random.PRNGKey(0))
    dataset = InstructionDataset.from_entries(_entries()[:24])
    exact = InstructionLoader(dataset, batch_size=5, allowed_max_length=cfg.context_length, bucket=None)
    bucketed = InstructionLoader(dataset, batch_size=5, allowed_max_length=cfg.context_length, bucket=32)
    loss = jax.jit(lambda p, x, y: cross_entropy(GPTModel(cfg).apply({"params": p}, x), y))
    shapes = set()
    for (x, y), (bx, by) in zip(exact.iter_epoch(0), bucketed.iter_epoch(0), strict=True):
        assert bx.shape[1] % 32 == 0 or bx.shape[1] == cfg.context_length
        shapes.add(bx.shape)
        a, b = float(loss(params, x, y)), float(loss(params, bx, by))
        assert abs(a - b) < 1e-5, f"bucketed loss {b} differs from the book batch's {a}"
    assert len({x.shape for x, _ in exact.iter_epoch(0)}) > len(shapes)  # the book's shapes vary more
    before = loss._cache_size()
    for x, y in bucketed.iter_epoch(0):
        loss(params, x, y)
    # every bucketed batch reused one of at most context_length / bucket compiled shapes
    assert loss._cache_size() == before and len(shapes) <= cfg.context_length // 32


def test_loss_ignores_targets_as_torch_cross_entropy_does():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 5))
    targets[0, 2:] = -100
    targets[2, 0] = -100
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).flatten(0, 1), torch.from_numpy(targets).flatten()
    ).item()
    assert abs(float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) - expected) < 1e-6
    # the chunked training loss (no logits held) gives the same number and the same gradients
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    head = rng.normal(size=(4, 11)).astype(np.float32)
    h, w = torch.from_numpy(hidden).requires_grad_(), torch.from_numpy(head).requires_grad_()
    torch_loss = torch.nn.functional.cross_entropy((h @ w).flatten(0, 1), torch.from_numpy(targets).flatten())
    torch_loss.backward()
    ours, grads = jax.value_and_grad(linear_cross_entropy, argnums=(0, 1))(
        jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), "float32", 4
    )
    assert abs(float(ours) - torch_loss.item()) < 1e-5
    assert np.allclose(grads[0], h.grad.numpy(), atol=1e-6) and np.allclose(
        grads[1], w.grad.numpy(), atol=1e-6
    )


# --------------------------------------------------------------------------------------------
# Training exact against the book (book 7.6)
# --------------------------------------------------------------------------------------------


def test_training_matches_the_books_loss_step_after_step():
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04", reason="needs the reference extra")
    ch05 = pytest.importorskip("llms_from_scratch.ch05")
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    book_cfg = {**BOOK_CFG, "vocab_size": 50257, "context_length": 64, "qkv_bias": True}
    torch.manual_seed(123)
    model = ch04.GPTModel(book_cfg)
    cfg, params = load_book_state_dict(model.state_dict(), n_heads=book_cfg["n_heads"])
    cfg = cfg.replace(drop_rate=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    tcfg = TrainConfig(learning_rate=5e-5, weight_decay=0.1, batch_size=4)
    state, tx = create_train_state(cfg, tcfg, jax.random.PRNGKey(0), 5, params)
    step_fn = jit_train_step(cfg, tx)

    entries = _entries()[:12]
    book = _book_batches(ch07, torch, entries, 4, 64, False)  # the book's collate, cut to the context
    ours = InstructionLoader(InstructionDataset.from_entries(entries), batch_size=4, allowed_max_length=64)
    for i, ((x, y), (bx, by)) in enumerate(zip(ours.iter_epoch(0), book, strict=True)):
        model.train()
        optimizer.zero_grad()
        loss = ch05.calc_loss_batch(torch.from_numpy(bx), torch.from_numpy(by), model, "cpu")
        loss.backward()
        optimizer.step()
        state, metrics = step_fn(state, (jnp.asarray(x), jnp.asarray(y)))
        ours_loss = float(metrics["loss"])
        assert abs(ours_loss - loss.item()) < 1e-4, f"step {i}: loss {ours_loss} vs the book's {loss.item()}"
        model.eval()
        with torch.no_grad():
            book_eval = ch05.calc_loss_loader(
                [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in book], model, "cpu", num_batches=2
            )
        ours_eval = calc_loss_loader(state.params, cfg, ours.iter_epoch(0), num_batches=2)
        assert abs(ours_eval - book_eval) < 1e-4, f"after step {i}: eval loss {ours_eval} vs {book_eval}"


def test_response_loss_counts_the_answer_tokens_only():
    cfg = _tiny_cfg().replace(context_length=256)
    params = init_params(cfg, jax.random.PRNGKey(1))
    entries = _entries()[:2]
    loader = InstructionLoader(
        InstructionDataset.from_entries(entries), batch_size=2, allowed_max_length=None
    )
    tokenizer = get_tokenizer()
    rows = []  # each entry as its prompt's ids, then its answer's, then end-of-text
    for entry in entries:
        rows.append((tokenizer.encode(format_prompt(entry)), tokenizer.encode(entry["output"]) + [50256]))
    longest = max(len(p) + len(a) for p, a in rows)
    ids = np.full((len(rows), longest), 50256, np.int32)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = p + a
    # causal: what follows a row's end changes none of its logits
    logp = np.asarray(jax.nn.log_softmax(GPTModel(cfg).apply({"params": params}, jnp.asarray(ids)), -1))
    total, count = 0.0, 0
    for i, (p, a) in enumerate(rows):
        for t in range(len(p), len(p) + len(a)):  # position t - 1 predicts the answer's token t
            total -= logp[i, t - 1, ids[i, t]]
            count += 1
    assert abs(response_loss(params, cfg, loader) - total / count) < 1e-4


# --------------------------------------------------------------------------------------------
# Responses (book 7.7)
# --------------------------------------------------------------------------------------------


def test_responses_are_the_books_greedy_generation():
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04", reason="needs the reference extra")
    ch05 = pytest.importorskip("llms_from_scratch.ch05")
    book_cfg = {**BOOK_CFG, "vocab_size": 50257, "context_length": 128, "qkv_bias": True}
    torch.manual_seed(7)
    model = ch04.GPTModel(book_cfg).eval()
    cfg, params = load_book_state_dict(model.state_dict(), n_heads=book_cfg["n_heads"])
    tokenizer = get_tokenizer()
    entries = _entries()[:3]
    seen = []
    ours = generate_responses(
        params, cfg, entries, max_new_tokens=8, batch_size=3, on_batch=lambda s, r: seen.append((s, r))
    )
    assert seen == [(0, ours)]  # one batch of prompts of different lengths
    for entry, response in zip(entries, ours, strict=True):
        input_text = format_input(entry)
        idx = torch.tensor(tokenizer.encode(input_text))[None]
        ids = ch05.generate(model, idx, 8, book_cfg["context_length"], eos_id=50256)
        generated_text = tokenizer.decode(ids[0].tolist())
        assert response == generated_text[len(input_text) :].replace("### Response:", "").strip()


def test_responses_file_is_written_whole(tmp_path):
    path = tmp_path / "instruction-data-with-response.json"
    write_json_atomic(path, [{"a": 1}])
    write_json_atomic(path, [{"a": 2}])
    assert json.loads(path.read_text()) == [{"a": 2}] and [p.name for p in tmp_path.iterdir()] == [path.name]
    plain = tmp_path / "plain"
    plain.write_text("")
    assert path.stat().st_mode == plain.stat().st_mode  # readable as any file the user writes


# --------------------------------------------------------------------------------------------
# The judge (book 7.8), against a local server speaking Ollama's and OpenAI's chat APIs
# --------------------------------------------------------------------------------------------


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    requests: list = []
    reply = "85"

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        if self.path == "/api/chat":  # Ollama streams the message in JSON lines
            self.send_response(200)
            self.end_headers()
            for piece in (self.reply[:1], self.reply[1:]):
                self.wfile.write((json.dumps({"message": {"content": piece}, "done": False}) + "\n").encode())
            self.wfile.write((json.dumps({"message": {"content": ""}, "done": True}) + "\n").encode())
        elif self.path == "/v1/chat/completions":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps({"choices": [{"message": {"content": self.reply}}]}).encode())
        else:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"no such endpoint")

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    _JudgeHandler.requests, _JudgeHandler.reply = [], "85"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _JudgeHandler
    server.shutdown()
    server.server_close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_speaks_ollamas_streaming_api_with_the_books_payload(judge):
    url, handler = judge
    entry = {**_entries()[0], "model_response": "An answer."}
    assert generate_model_scores([entry, entry], model="llama3", url=url) == [85, 85]
    path, body = handler.requests[0]
    assert path == "/api/chat"
    assert body == {
        "model": "llama3",
        "messages": [{"role": "user", "content": scoring_prompt(entry)}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }


def test_scoring_prompt_is_the_books(monkeypatch):
    ch07 = pytest.importorskip("llms_from_scratch.ch07", reason="needs the reference extra")
    entry = {**_entries()[1], "model_response": "Blue."}
    sent = []  # what the book's generate_model_scores would send to Ollama
    monkeypatch.setattr(ch07, "query_model", lambda prompt, model: sent.append(prompt) or "50")
    assert ch07.generate_model_scores([entry], "model_response") == [50]
    assert sent == [scoring_prompt(entry)]


def test_judge_speaks_the_openai_api_and_skips_non_integers(judge, capsys):
    url, handler = judge
    entry = {**_entries()[0], "model_response": "An answer."}
    assert query_model("hi", "gpt-x", url + "/v1") == "85"
    assert handler.requests[-1][0] == "/v1/chat/completions" and handler.requests[-1][1]["model"] == "gpt-x"
    handler.reply = "about 70"
    assert generate_model_scores([entry], url=url + "/v1/chat/completions") == []
    assert "Could not convert score: about 70" in capsys.readouterr().out


def test_answers_of_the_wrong_type_are_named_before_the_judge_is_asked(judge):
    url, handler = judge
    entries = [{**_entries()[0], "model_response": "fine"}, {**_entries()[0], "model_response": 7}]
    with pytest.raises(
        InstructionDataError, match=r"entry 1, field 'model_response' must be a string, got int"
    ):
        generate_model_scores(entries, url=url)
    assert handler.requests == []


def test_a_judge_that_does_not_answer_is_named(judge):
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(JudgeError, match=re.escape(f"the judge at {dead}/api/chat does not answer")):
        check_judge(dead)
    url, _ = judge
    with pytest.raises(JudgeError, match="answered HTTP 404"):
        query_model("hi", url=url + "/other")
    with pytest.raises(JudgeError, match="not an http"):
        query_model("hi", url="localhost:11434")


def test_judge_addresses_and_bucket_lengths():
    assert judge_endpoint("http://host:11434") == ("http://host:11434/api/chat", "ollama")
    assert judge_endpoint("http://host:11434/api/chat/") == ("http://host:11434/api/chat", "ollama")
    assert judge_endpoint("https://h/v1") == ("https://h/v1/chat/completions", "openai")
    assert judge_endpoint("http://h:8000/v1/chat/completions") == (
        "http://h:8000/v1/chat/completions",
        "openai",
    )
    # lengths round up to the bucket, never past the cap, never below the length itself
    assert [bucket_length(n, 64, 128) for n in (1, 64, 65, 128)] == [64, 64, 128, 128]
    assert (
        bucket_length(130, 64, 128) == 130 and bucket_length(70, None) == 70 and bucket_length(70, 64) == 128
    )
