"""Chapter 6 classification against the book's own code (llms_from_scratch.ch06), data and training.

The SMS Spam Collection copy in ../shared/data is the UCI file (Almeida and Gómez Hidalgo,
CC BY 4.0); the tests that need it skip where it is absent.
"""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from book_reference import book_classifier_step
from flax.traverse_util import flatten_dict

from jaxgpt import classify
from jaxgpt.classify import (
    ClassificationLoader,
    ClassifyDataError,
    add_classification_head,
    balance_classes,
    calc_accuracy_loader,
    calc_loss_loader,
    classifier_from_book_state_dict,
    classifier_logits,
    classify_review,
    combine_params,
    create_classifier_state,
    jit_classifier_train_step,
    lm_hidden_states,
    make_classifier_optimizer,
    make_dataset,
    partition_params,
    random_split,
    read_labeled_texts,
)
from jaxgpt.config import GPTConfig
from jaxgpt.model import count_params, init_params
from jaxgpt.tokenizer import get_tokenizer

SMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "SMSSpamCollection"
needs_sms = pytest.mark.skipif(not SMS.is_file(), reason="the SMS Spam Collection copy is not here")

BOOK_CFG = {
    "vocab_size": 97,
    "context_length": 16,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 3,
    "drop_rate": 0.0,
    "qkv_bias": True,  # as chapter 6's BASE_CONFIG (GPT-2's weights have the biases)
}
TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@needs_sms
def test_sms_file_reads_all_lines_where_the_books_pandas_read_merges_some():
    pd = pytest.importorskip("pandas")
    data = read_labeled_texts(SMS)
    assert len(data) == 5574 and data.label_names == ("ham", "spam")
    assert data.counts() == {"ham": 4827, "spam": 747}  # the UCI archive's own counts
    book = pd.read_csv(SMS, sep="\t", header=None, names=["Label", "Text"])  # the book's reading
    assert book["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}


def _book_frame(pd):
    """The SMS file read by pandas with quoting off: the same rows as read_labeled_texts."""
    return pd.read_csv(
        SMS, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE, na_filter=False
    )


@needs_sms
def test_balance_and_split_are_the_books_functions_on_the_same_rows():
    pd = pytest.importorskip("pandas")
    ch06 = pytest.importorskip("llms_from_scratch.ch06")
    df = _book_frame(pd)
    data = read_labeled_texts(SMS)
    assert list(df["Text"]) == list(data.texts) and list(df["Label"]) == [
        data.label_names[i] for i in data.labels
    ]

    balanced = ch06.create_balanced_dataset(df)
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    book_splits = ch06.random_split(balanced, 0.7, 0.1)
    ours = random_split(balance_classes(data, seed=123), 0.7, 0.1, seed=123)
    # The merged lines are ham, so spam keeps its 747 and the balanced set has 2 * 747 = 1494
    # messages whichever way the file is read: int(1494 * 0.7) = 1045, int(149.4) = 149, 300 left.
    assert [len(s) for s in ours] == [1045, 149, 300]
    for book, mine in zip(book_splits, ours, strict=True):
        assert list(book["Text"]) == list(mine.texts)
        assert list(book["Label"]) == list(mine.labels)
    assert ours[0].counts()["spam"] + ours[1].counts()["spam"] + ours[2].counts()["spam"] == 747


@needs_sms
def test_padded_datasets_equal_the_books_spam_dataset(tmp_path):
    pd = pytest.importorskip("pandas")
    ch06 = pytest.importorskip("llms_from_scratch.ch06")
    tokenizer = get_tokenizer()
    train, val, _ = random_split(balance_classes(read_labeled_texts(SMS)))
    paths = {}
    for name, split in (("train", train), ("val", val)):
        frame = pd.DataFrame({"Label": split.labels, "Text": list(split.texts)})
        paths[name] = tmp_path / f"{name}.csv"
        frame.to_csv(paths[name], index=None)
    book_train = ch06.SpamDataset(paths["train"], tokenizer)
    book_val = ch06.SpamDataset(paths["val"], tokenizer, max_length=book_train.max_length)

    ours_train = make_dataset(train, tokenizer, context_length=1024)
    ours_val = make_dataset(val, tokenizer, max_length=ours_train.max_length, context_length=1024)
    assert ours_train.max_length == book_train.max_length
    np.testing.assert_array_equal(ours_train.inputs, np.array(book_train.encoded_texts))
    np.testing.assert_array_equal(ours_val.inputs, np.array(book_val.encoded_texts))
    np.testing.assert_array_equal(ours_train.labels, book_train.data["Label"].to_numpy())


THREE_CLASS = """text,label
"good, really good",pos
fine,neutral
bad,neg
"great",pos
okay,neutral
awful,neg
superb,pos
meh,neutral
terrible,neg
lovely,pos
so-so,neutral
"""


def test_three_class_csv_balances_to_the_smallest_class(tmp_path):
    path = tmp_path / "three.csv"
    path.write_text(THREE_CLASS)
    data = read_labeled_texts(path)
    assert data.label_names == ("neg", "neutral", "pos")  # sorted names
    assert data.counts() == {"neg": 3, "neutral": 4, "pos": 4}
    assert data.texts[0] == "good, really good" and int(data.lines[0]) == 2

    balanced = balance_classes(data, seed=7)
    assert balanced.counts() == {"neg": 3, "neutral": 3, "pos": 3}
    # the smallest class keeps every example in file order; the others keep 3 of their 4, no repeats
    assert balanced.texts[:3] == ("bad", "awful", "terrible")
    assert len(set(balanced.texts)) == 9 and set(balanced.texts) <= set(data.texts)
    rest = balance_classes(data, seed=7)
    assert rest.texts == balanced.texts  # the seed decides

    train, val, test = random_split(balanced, 0.7, 0.1, seed=1)
    assert [len(train), len(val), len(test)] == [6, 0, 3]  # int(6.3), int(0.9), the rest
    assert sorted(train.texts + test.texts) == sorted(balanced.texts)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("no_tab.tsv", "ham\tfine\nspam free money\n", "line 2: no tab"),
        ("one_class.tsv", "ham\ta\nham\tb\n", "at least two classes"),
        ("empty.tsv", "\n\n", "no labelled texts"),
        ("bad_header.csv", "message,kind\nhi,a\n", "line 1: header"),
        ("fields.csv", "text,label\nhi,a,extra\n", "line 2: 3 fields"),
    ],
)
def test_bad_files_name_the_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ClassifyDataError, match=expected):
        read_labeled_texts(path)


def test_unknown_label_names_its_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("ham\ta\nspam\tb\neggs\tc\n")
    with pytest.raises(ClassifyDataError, match=r"line 3: unknown label 'eggs'"):
        read_labeled_texts(path, label_names=["ham", "spam"])


def test_a_text_longer_than_the_context_is_refused_with_its_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("ham\tshort\nspam\t" + "word " * 40 + "\n")  # "word", 39 x " word", " ": 41 tokens
    data = read_labeled_texts(path)
    tokenizer = get_tokenizer()
    with pytest.raises(
        ClassifyDataError, match=r"line 2: the text has 41 tokens, longer than the model's context of 16"
    ):
        make_dataset(data, tokenizer, context_length=16)
    with pytest.raises(ClassifyDataError, match="max length 17 is longer"):
        make_dataset(data, tokenizer, max_length=17, context_length=16)
    ds = make_dataset(data, tokenizer, max_length=4, context_length=16)  # truncated, as the book does
    assert ds.inputs.shape == (2, 4)
    assert list(ds.inputs[0]) == tokenizer.encode("short") + [50256] * 3


def test_loader_batches_follow_the_books_settings():
    ds = classify.ClassificationDataset(np.arange(20, dtype=np.int32).reshape(10, 2), np.arange(10) % 2, 2)
    train = ClassificationLoader(ds, batch_size=4, shuffle=True, drop_last=True, seed=3)
    batches = list(train.iter_epoch(0))
    assert len(batches) == len(train) == 2 and all(len(y) == 4 for _, y in batches)
    assert [list(b[1]) for b in train.iter_epoch(1)] != [list(b[1]) for b in batches]  # a new order per epoch
    val = ClassificationLoader(ds, batch_size=4)
    assert [len(y) for _, y in val] == [4, 4, 2]


# --------------------------------------------------------------------------------------------
# The model change
# --------------------------------------------------------------------------------------------


def _classifier(cfg: GPTConfig = TINY, seed: int = 0):
    params = init_params(cfg, jax.random.PRNGKey(seed))
    return add_classification_head(params, cfg, 3, jax.random.PRNGKey(seed + 1))


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 10)), jnp.int32)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_are_the_models_last_hidden_state_through_the_new_head(tied):
    cfg = TINY.replace(tie_embeddings=tied)
    params = _classifier(cfg)
    assert params["out_head"]["kernel"].shape == (32, 3) and params["out_head"]["bias"].shape == (3,)
    assert params["tok_emb"]["embedding"].shape == (97, 32)  # the embedding is kept
    hidden = lm_hidden_states(params, cfg, IDS)[:, -1, :]  # GPTModel's own trunk
    expected = hidden @ params["out_head"]["kernel"] + params["out_head"]["bias"][None, :]
    np.testing.assert_allclose(classifier_logits(params, cfg, IDS), expected, atol=1e-5)


@pytest.mark.parametrize("spec", ["head", "last-block", "last-2", "last-3", "all"])
def test_partition_round_trips_and_gives_the_same_logits(spec):
    params = _classifier()
    train, frozen = partition_params(params, TINY, spec)
    whole = classifier_logits(params, TINY, IDS)
    np.testing.assert_allclose(classifier_logits(train, TINY, IDS, frozen=frozen), whole, atol=1e-5)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, combine_params(train, frozen), params))
    n_train = {"head": 0, "last-block": 1, "last-2": 2, "last-3": 3, "all": 3}[spec]
    if n_train:
        assert train["trf_blocks"]["norm1"]["scale"].shape[0] == n_train
    assert ("final_norm" in train) == (spec != "head") and ("tok_emb" in train) == (spec == "all")
    assert count_params(train) + count_params(frozen) == count_params(params)


@pytest.mark.parametrize("spec", ["last-0", "last-4", "first-1", "blocks"])
def test_bad_trainable_spec_is_refused(spec):
    with pytest.raises(ValueError, match="trainable must be last-block, last-N with 1 <= N <= 3"):
        classify.parse_trainable(spec, 3)


def _count_dots(jaxpr) -> int:
    """Matmuls a jaxpr runs: a scan's body counts once per iteration."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    n += times * _count_dots(getattr(inner, "jaxpr", inner))
    return n


def test_frozen_blocks_get_no_backward_pass():
    params = _classifier()
    labels = jnp.array([0, 1, 2, 0])

    def dots(spec: str, grad: bool) -> int:
        train, frozen = partition_params(params, TINY, spec)

        def loss(t):
            return classify.classification_loss(classifier_logits(t, TINY, IDS, frozen=frozen), labels)

        fn = jax.value_and_grad(loss) if grad else loss
        return _count_dots(jax.make_jaxpr(fn)(train).jaxpr)

    forward = dots("all", grad=False)
    # head only: the forward pass, plus one matmul for the head's kernel gradient and nothing more
    assert dots("head", grad=True) == forward + 1
    assert dots("head", grad=True) < dots("last-block", grad=True) < dots("all", grad=True)


# --------------------------------------------------------------------------------------------
# Exact against the book's training (book 6.7)
# --------------------------------------------------------------------------------------------


def _book_setup(spec: str):
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    torch.manual_seed(123)
    model = ch04.GPTModel(BOOK_CFG)
    for param in model.parameters():  # the book's freezing (6.5)
        param.requires_grad = False
    torch.manual_seed(123)
    model.out_head = torch.nn.Linear(in_features=BOOK_CFG["emb_dim"], out_features=2)
    if spec == "all":
        for param in model.parameters():
            param.requires_grad = True
    elif spec == "last-block":
        for param in model.trf_blocks[-1].parameters():
            param.requires_grad = True
        for param in model.final_norm.parameters():
            param.requires_grad = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    return model, optimizer


@pytest.mark.parametrize("spec", ["last-block", "head", "all"])
def test_training_matches_the_books_step_after_step(spec):
    torch = pytest.importorskip("torch")
    ch06 = pytest.importorskip("llms_from_scratch.ch06")
    model, optimizer = _book_setup(spec)
    cfg, params = classifier_from_book_state_dict(model.state_dict(), n_heads=BOOK_CFG["n_heads"])
    cfg = cfg.replace(drop_rate=BOOK_CFG["drop_rate"])  # a state dict does not record dropout
    assert cfg.qkv_bias and not cfg.tie_embeddings and params["out_head"]["kernel"].shape == (32, 2)
    tx = make_classifier_optimizer(5e-5, 0.1)
    state = create_classifier_state(params, cfg, tx, spec)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_params(state.trainable) == n_trainable
    # optimizer state: AdamW's two moments for the trainable params, nothing for the frozen ones
    assert sum(int(np.size(x)) for x in jax.tree.leaves(state.opt_state)) == 2 * n_trainable + 1

    rng = np.random.default_rng(1)
    batches = [
        (rng.integers(0, 97, (4, 12)).astype(np.int64), rng.integers(0, 2, (4,)).astype(np.int64))
        for _ in range(6)
    ]
    eval_batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches[:3]]
    step_fn = jit_classifier_train_step(cfg, tx)
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    for i, (x, y) in enumerate(batches):
        loss = book_classifier_step(ch06, model, optimizer, x, y)
        state, metrics = step_fn(state, (jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)))
        assert abs(float(metrics["loss"]) - loss) < 1e-4, f"step {i}: loss {float(metrics['loss'])} vs {loss}"

        book_acc = ch06.calc_accuracy_loader(eval_batches, model, "cpu")
        book_loss = ch06.calc_loss_loader(eval_batches, model, "cpu")
        ours = [(np.asarray(a), np.asarray(b)) for a, b in batches[:3]]
        acc = calc_accuracy_loader(state.trainable, cfg, ours, frozen=state.frozen)
        val = calc_loss_loader(state.trainable, cfg, ours, frozen=state.frozen)
        assert acc == book_acc and abs(val - book_loss) < 1e-4, (
            f"step {i}: {acc, val} vs {book_acc, book_loss}"
        )

    _, after = classifier_from_book_state_dict(model.state_dict(), n_heads=BOOK_CFG["n_heads"])
    ours, book = flatten_dict(state.params), flatten_dict(after)
    assert ours.keys() == book.keys()
    for name in ours:
        diff = float(np.max(np.abs(np.asarray(ours[name]) - np.asarray(book[name]))))
        # The key bias adds the same q . b_k to every score of a query, which the softmax cancels:
        # its true gradient is zero, and AdamW turns each side's float noise into steps of up to
        # lr. Only that bound can hold for it; every other tensor agrees closely.
        tol = 2 * len(batches) * 5e-5 if name[-2:] == ("W_key", "bias") else 1e-5
        assert diff < tol, f"{'/'.join(name)} differs from the book's by {diff}"
    assert jax.tree.all(jax.tree.map(np.array_equal, frozen_before, jax.tree.map(np.asarray, state.frozen)))


def test_train_classifier_simple_prints_the_books_lines_and_resumes_exactly(capsys):
    rng = np.random.default_rng(2)
    ds = classify.ClassificationDataset(
        rng.integers(0, 97, (24, 10)).astype(np.int32), rng.integers(0, 3, 24), 10
    )
    train = ClassificationLoader(ds, batch_size=8, shuffle=True, drop_last=True, seed=5)
    val = ClassificationLoader(ds, batch_size=8)
    tx = make_classifier_optimizer(1e-3, 0.1)
    cfg = TINY.replace(drop_rate=0.1)  # with dropout on, resuming must still take the same steps

    def fresh():
        return create_classifier_state(_classifier(cfg), cfg, tx, "last-block")

    whole, history = classify.train_classifier_simple(
        fresh(), tx, cfg, train, val, 3, eval_freq=2, eval_iter=1
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Ep 1 (Step 000000): Train loss ") and ", Val loss " in out[0]
    assert out[2].startswith("Training accuracy: ") and "% | Validation accuracy: " in out[2]
    assert history.examples_seen == 72 and len(history.train_accs) == 3 and len(history.train_losses) == 5

    first, part = classify.train_classifier_simple(fresh(), tx, cfg, train, val, 1, 2, 1, print_fn=None)
    resumed, history2 = classify.train_classifier_simple(
        first, tx, cfg, train, val, 3, 2, 1, history=part, print_fn=None
    )
    assert history2.train_losses == history.train_losses and history2.val_accs == history.val_accs
    assert jax.tree.all(jax.tree.map(jnp.array_equal, resumed.params, whole.params))


def test_classify_review_pads_like_the_book():
    params = _classifier()
    tokenizer = get_tokenizer()
    text = "You are a winner"
    ids = tokenizer.encode(text) + [50256] * (12 - len(tokenizer.encode(text)))
    expected = int(jnp.argmax(classifier_logits(params, TINY, jnp.asarray([ids], jnp.int32))[0]))
    names = ("a", "b", "c")
    assert (
        classify_review(text, params, TINY, max_length=12, label_names=names, tokenizer=tokenizer)
        == names[expected]
    )
    with pytest.raises(ValueError, match="max_length 17 is longer"):
        classify_review(text, params, TINY, max_length=17, tokenizer=tokenizer)
