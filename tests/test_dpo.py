"""DPO (the book's bonus to chapter 7) against the book's own code (tests/book_dpo_reference.py).

The preference file in ../shared/data is the book's instruction-data-with-preference.json
(rasbt/LLMs-from-scratch, Apache-2.0); where it is absent a few entries written here stand in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.dpo import (
    PreferenceDataError,
    PreferenceLoader,
    collate_preference,
    create_dpo_state,
    dpo_batch_loss,
    dpo_loss,
    encode_preference_data,
    eval_line,
    evaluate_dpo,
    jit_dpo_train_step,
    make_dpo_optimizer,
    read_preference_data,
    sequence_logprobs,
    split_preference_data,
)
from jaxgpt.model import count_params
from jaxgpt.tokenizer import get_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data-with-preference.json"
FALLBACK = [
    {
        "instruction": "Name a prime number.",
        "input": "",
        "output": "7",
        "chosen": "7 is prime.",
        "rejected": "7.",
    },
    {
        "instruction": "Rewrite in passive voice.",
        "input": "The cat ate the fish.",
        "output": "The fish was eaten by the cat.",
        "chosen": "The fish was eaten by the cat.",
        "rejected": "The stupid fish got eaten by the cat, obviously.",
    },
    {
        "instruction": "Add 2 and 3.",
        "input": "",
        "output": "5",
        "chosen": "2 plus 3 is 5.",
        "rejected": "Five",
    },
    {"instruction": "Say hello.", "input": "", "output": "Hello.", "chosen": "Hello!", "rejected": "What?"},
]
# A book GPTModel config: GPT-2's token ids folded into a vocabulary of 97 keep the model tiny.
BOOK_CFG = {
    "vocab_size": 97,
    "context_length": 96,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": False,
}


def _entries(n: int = 16) -> list[dict]:
    if DATA.exists():
        return json.loads(DATA.read_text())[:n]
    return (FALLBACK * (n // len(FALLBACK) + 1))[:n]


_jit_loss = jax.jit(dpo_batch_loss, static_argnums=(2,))


def _torch_batch(torch, batch):
    return {
        k: torch.from_numpy(np.asarray(v, np.int64 if "mask" not in k else bool)) for k, v in batch.items()
    }


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


def _write(tmp_path, obj, raw: str | None = None) -> Path:
    path = tmp_path / "prefs.json"
    path.write_text(raw if raw is not None else json.dumps(obj))
    return path


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda es: es[2].pop("chosen"), "entry 2 has no 'chosen'"),
        (lambda es: es[1].pop("rejected"), "entry 1 has no 'rejected'"),
        (lambda es: es[3].pop("instruction"), "entry 3 has no 'instruction'"),
        (lambda es: es[0].update(rejected=["no"]), "entry 0 field 'rejected' is a list, not a string"),
        (lambda es: es[2].update(input=None), "entry 2 field 'input' is a NoneType, not a string"),
        (lambda es: es.__setitem__(1, "text"), "entry 1 is a str, not an object"),
    ],
)
def test_bad_entries_are_named_by_index_and_field(tmp_path, mutate, match):
    entries = [dict(e) for e in FALLBACK]
    mutate(entries)
    with pytest.raises(PreferenceDataError, match=match):
        read_preference_data(_write(tmp_path, entries))


@pytest.mark.parametrize(
    ("raw", "match"),
    [("", "is empty"), ("[]", "holds no entries"), ('{"a": 1}', "holds a dict"), ("[{", "not valid JSON")],
)
def test_bad_files_are_named(tmp_path, raw, match):
    path = _write(tmp_path, None, raw)
    with pytest.raises(PreferenceDataError, match=match) as e:
        read_preference_data(path)
    assert str(path) in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(PreferenceDataError, match="does not exist"):
        read_preference_data(tmp_path / "missing.json")


def test_split_is_the_books_85_10_5_in_file_order():
    entries = list(range(1100))
    train, val, test = split_preference_data(entries)
    # the book: train = data[:935], test = data[935:1045], val = data[1045:]
    assert (train, test, val) == (entries[:935], entries[935:1045], entries[1045:])


# --------------------------------------------------------------------------------------------
# Batches: the book's collate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allowed_max_length", [None, 1024, 60])
def test_batches_equal_the_books_collate(allowed_max_length):
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("book_dpo_reference", reason="needs torch and llms_from_scratch")
    entries, tokenizer = _entries(16), get_tokenizer()
    book_ds = ref.PreferenceDataset(entries, tokenizer)
    ours = encode_preference_data(entries, tokenizer=tokenizer)
    assert ours == [book_ds[i] for i in range(len(entries))]
    for start in range(0, len(entries), 4):
        book = ref.custom_collate_fn(
            book_ds.encoded_texts[start : start + 4], allowed_max_length=allowed_max_length
        )
        mine = collate_preference(ours[start : start + 4], allowed_max_length=allowed_max_length)
        for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
            np.testing.assert_array_equal(mine[key], book[key].numpy(), err_msg=f"batch {start // 4} {key}")
        assert mine["chosen"].dtype == np.int32 and mine["chosen_mask"].dtype == bool
    del torch


def test_bucketed_padding_leaves_loss_and_rewards_unchanged():
    items = encode_preference_data(_entries(4))
    cfg, params, ref_params = _tiny_models()
    results = []
    for pad_multiple in (1, BOOK_CFG["context_length"]):  # the book's length; the whole context
        batch = collate_preference(
            items, allowed_max_length=BOOK_CFG["context_length"], pad_multiple=pad_multiple
        )
        batch = {k: jnp.asarray(v % cfg.vocab_size if "mask" not in k else v) for k, v in batch.items()}
        loss, (chosen, rejected) = _jit_loss(params, ref_params, cfg, batch)
        results.append((batch["chosen"].shape[1], float(loss), np.asarray(chosen), np.asarray(rejected)))
    (t_book, *book), (t_padded, *padded) = results
    assert t_book < t_padded == BOOK_CFG["context_length"]
    assert abs(book[0] - padded[0]) < 1e-5, f"loss {padded[0]} vs {book[0]}"  # float32 rounding only
    for name, a, b in zip(("chosen", "rejected"), book[1:], padded[1:], strict=True):
        assert np.max(np.abs(a - b)) < 1e-5, f"{name} rewards differ by {np.max(np.abs(a - b))}"


def test_bucketing_bounds_the_number_of_batch_shapes():
    items = tuple(encode_preference_data(_entries(64)))
    lengths = {}
    for pad_multiple in (1, 32):
        loader = PreferenceLoader(items, 4, allowed_max_length=96, pad_multiple=pad_multiple)
        lengths[pad_multiple] = {b["chosen"].shape[1] for b in loader}
    assert lengths[32] <= {32, 64, 96}  # at most allowed / 32 shapes, each compiled once
    assert len(lengths[1]) > len(lengths[32])
    book_lengths = {min(max(len(i["chosen"]), len(i["rejected"])) + 1, 96) for i in items}
    assert max(lengths[1]) == max(book_lengths)


def test_a_prompt_that_fills_the_allowed_length_is_named():
    from jaxgpt.dpo import check_fits

    items = encode_preference_data(_entries(4))
    check_fits(items, 1024)
    with pytest.raises(PreferenceDataError, match="entry 0: its prompt takes .* allowed length 20"):
        check_fits(items, 20, "")


# --------------------------------------------------------------------------------------------
# Log-probabilities and the loss against the book's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_and_rewards_equal_the_books_on_the_same_logits(beta):
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("book_dpo_reference", reason="needs torch and llms_from_scratch")
    rng = np.random.default_rng(0)
    B, T, V = 3, 11, 13
    ids = {k: rng.integers(0, V, (B, T)) for k in ("chosen", "rejected")}
    masks = {k: rng.random((B, T)) < 0.6 for k in ("chosen", "rejected")}
    for m in masks.values():
        m[:, 1] = True  # every row counts at least one token
    logits = {
        (who, k): rng.normal(0, 3, (B, T, V)).astype(np.float32) for who in ("policy", "ref") for k in ids
    }

    def book_lp(who, k):
        return ref.compute_logprobs(
            torch.from_numpy(logits[who, k]), torch.from_numpy(ids[k]), torch.from_numpy(masks[k])
        )

    def our_lp(who, k):
        return sequence_logprobs(jnp.asarray(logits[who, k]), jnp.asarray(ids[k]), jnp.asarray(masks[k]))

    for who in ("policy", "ref"):
        for k in ids:
            diff = np.max(np.abs(np.asarray(our_lp(who, k)) - book_lp(who, k).numpy()))
            assert diff < 1e-5, f"{who} {k} log-probs differ by {diff}"
    order = [("policy", "chosen"), ("policy", "rejected"), ("ref", "chosen"), ("ref", "rejected")]
    book = ref.compute_dpo_loss(*[book_lp(*o) for o in order], beta=beta)
    loss, chosen, rejected = dpo_loss(*[our_lp(*o) for o in order], beta=beta)
    for name, mine, theirs in zip(
        ("loss", "chosen reward", "rejected reward"),
        (loss, chosen.mean(), rejected.mean()),
        book,
        strict=True,
    ):
        assert abs(float(mine) - theirs.item()) < 1e-5, f"{name}: {float(mine)} vs {theirs.item()}"
    assert abs(float(loss) - math.log(2)) > 1e-3  # the logits differ: a test that can fail


def _book_models(seed_policy: int = 123, seed_ref: int = 123):
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    torch.manual_seed(seed_policy)
    policy = ch04.GPTModel(BOOK_CFG)
    torch.manual_seed(seed_ref)
    reference = ch04.GPTModel(BOOK_CFG).eval()
    return policy, reference


def _tiny_models(seed_ref: int = 7):
    """(cfg, policy params, reference params) of two seeded book-layout models, in jaxgpt."""
    from jaxgpt.config import GPTConfig
    from jaxgpt.model import init_params

    cfg = GPTConfig(**{**BOOK_CFG, "tie_embeddings": False})
    return cfg, init_params(cfg, jax.random.PRNGKey(0)), init_params(cfg, jax.random.PRNGKey(seed_ref))


def _folded_batches(n_entries: int, batch_size: int, vocab: int):
    """Batches of the first entries, all padded to the context length (one shape: one compile),
    GPT-2's token ids folded into ``vocab``."""
    T = BOOK_CFG["context_length"]
    items = encode_preference_data(_entries(n_entries))
    out = []
    for start in range(0, n_entries, batch_size):
        batch = collate_preference(items[start : start + batch_size], allowed_max_length=T, pad_multiple=T)
        batch["chosen"], batch["rejected"] = batch["chosen"] % vocab, batch["rejected"] % vocab
        out.append(batch)
    return out


def test_same_model_gives_the_books_dpo_loss_and_rewards():
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("book_dpo_reference", reason="needs torch and llms_from_scratch")
    from jaxgpt.weights import load_book_state_dict

    policy, reference = _book_models(123, 456)
    cfg, params = load_book_state_dict(policy.state_dict(), n_heads=BOOK_CFG["n_heads"])
    cfg = cfg.replace(drop_rate=0.0)  # a state dict does not record dropout; the book's DPO has none
    _, ref_params = load_book_state_dict(reference.state_dict(), n_heads=BOOK_CFG["n_heads"])
    policy.eval()
    for i, batch in enumerate(_folded_batches(8, 4, BOOK_CFG["vocab_size"])):
        with torch.no_grad():
            book = ref.compute_dpo_loss_batch(_torch_batch(torch, batch), policy, reference, beta=0.1)
        loss, (chosen, rejected) = _jit_loss(
            params, ref_params, cfg, {k: jnp.asarray(v) for k, v in batch.items()}
        )
        for name, mine, theirs in zip(
            ("loss", "chosen reward", "rejected reward"),
            (loss, chosen.mean(), rejected.mean()),
            book,
            strict=True,
        ):
            assert abs(float(mine) - theirs.item()) < 1e-5, (
                f"batch {i} {name}: {float(mine)} vs {theirs.item()}"
            )
        assert abs(float(chosen.mean())) > 1e-3  # two different models: non-zero rewards


def test_training_steps_match_the_books_step_after_step():
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("book_dpo_reference", reason="needs torch and llms_from_scratch")
    from jaxgpt.weights import load_book_state_dict

    lr, wd = 1e-3, 0.01  # a larger rate than the book's 5e-6, so the steps move the loss visibly
    policy, reference = _book_models(123, 123)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=wd)
    cfg, params = load_book_state_dict(policy.state_dict(), n_heads=BOOK_CFG["n_heads"])
    cfg = cfg.replace(drop_rate=0.0)  # a state dict does not record dropout; the book's DPO has none
    tx = make_dpo_optimizer(lr, wd)
    state = create_dpo_state(params, tx)
    ref_params = jax.tree.map(jnp.array, params)
    step_fn = jit_dpo_train_step(cfg, tx, 0.1)
    losses = []
    for i, batch in enumerate(_folded_batches(12, 4, BOOK_CFG["vocab_size"]) * 2):
        book_loss, book_chosen, book_rejected = ref.dpo_step(
            _torch_batch(torch, batch), policy, reference, optimizer, 0.1
        )
        state, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in batch.items()}, ref_params)
        got = {k: float(v) for k, v in metrics.items()}
        assert abs(got["loss"] - book_loss) < 1e-4, f"step {i}: loss {got['loss']} vs {book_loss}"
        assert abs(got["chosen_reward"] - book_chosen) < 1e-4, f"step {i}: chosen reward"
        assert abs(got["rejected_reward"] - book_rejected) < 1e-4, f"step {i}: rejected reward"
        losses.append(got["loss"])
    assert abs(losses[0] - math.log(2)) < 1e-6  # policy == reference before the first update
    assert losses[-1] < math.log(2) - 0.002, losses  # and the steps trained


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------


def test_loss_is_log_2_when_policy_is_the_reference():
    cfg, params, _ = _tiny_models()
    for batch in _folded_batches(8, 4, cfg.vocab_size):
        loss, (chosen, rejected) = _jit_loss(
            params, params, cfg, {k: jnp.asarray(v) for k, v in batch.items()}
        )
        assert abs(float(loss) - math.log(2)) < 1e-6
        assert float(jnp.abs(chosen).max()) == 0.0 and float(jnp.abs(rejected).max()) == 0.0


def test_reference_gets_no_gradient_no_optimizer_state_and_stays_untouched():
    cfg, params, ref_params = _tiny_models()
    batch = {k: jnp.asarray(v) for k, v in _folded_batches(4, 4, cfg.vocab_size)[0].items()}
    grads = jax.jit(jax.grad(lambda r: dpo_batch_loss(params, r, cfg, batch)[0]))(ref_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    before = jax.tree.map(np.array, ref_params)
    tx = make_dpo_optimizer(1e-3, 0.01)
    state = create_dpo_state(params, tx)
    # AdamW's two moments for the policy's params and one step count; nothing for the reference
    assert sum(int(np.size(x)) for x in jax.tree.leaves(state.opt_state)) == 2 * count_params(params) + 1
    step_fn = jit_dpo_train_step(cfg, tx, 0.1)
    for _ in range(3):
        state, metrics = step_fn(state, batch, ref_params)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, ref_params)))
    assert not np.array_equal(np.asarray(state.params["final_norm"]["scale"]), before["final_norm"]["scale"])
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    margin = float(metrics["chosen_reward"]) - float(metrics["rejected_reward"])
    assert abs(float(metrics["reward_margin"]) - margin) < 1e-6


def test_preference_accuracy_counts_pairs_with_the_larger_chosen_reward():
    cfg, params, ref_params = _tiny_models()
    batches = _folded_batches(8, 4, cfg.vocab_size)
    result = evaluate_dpo(params, ref_params, cfg, batches, beta=0.1)
    correct = 0
    for batch in batches:  # by hand: the rewards of each pair
        _, (chosen, rejected) = _jit_loss(
            params, ref_params, cfg, {k: jnp.asarray(v) for k, v in batch.items()}
        )
        correct += int((np.asarray(chosen) > np.asarray(rejected)).sum())
    assert result["accuracy"] == correct / 8
    assert math.isnan(evaluate_dpo(params, ref_params, cfg, [], beta=0.1)["loss"])


def test_eval_line_is_the_books_print():
    record = {
        "step": 6,
        "train_loss": 0.6931,
        "val_loss": 0.69,
        "train_reward_margin": 0.0123,
        "val_reward_margin": -0.5,
    }
    assert eval_line(1, record) == (
        "Ep 1 (Step 000005): Train loss 0.693, Val loss 0.690, "
        "Train reward margins 0.012, Val reward margins -0.500"
    )


def test_phi3_style_batches_count_only_the_response_side():
    from jaxgpt.instruct import format_prompt

    tokenizer, entry = get_tokenizer(), FALLBACK[1]
    (item,) = encode_preference_data([entry], "phi3")
    assert tokenizer.decode(item["chosen"]) == format_prompt(entry, "phi3") + entry["chosen"]
    batch = collate_preference([item])
    for key in ("chosen", "rejected"):
        counted = tokenizer.decode(batch[key][0][batch[f"{key}_mask"][0]].tolist())
        assert counted.endswith(entry[key]) and "<|user|>" not in counted and entry["input"] not in counted
