"""Fine-tuning for classification (book chapter 6): data, the classification head, training.

The pieces, in the order chapter 6 builds them:

  read_labeled_texts      a ``label<TAB>text`` TSV (the SMS Spam Collection) or a ``text,label`` CSV
  balance_classes         every class cut down to the smallest one's count (book 6.2)
  random_split            70/10/20 train/validation/test with a seed (book 6.2)
  make_dataset            tokenize and pad with token 50256 to one length (book 6.3, SpamDataset)
  ClassificationLoader    batches of (inputs (B, T), labels (B,)) (book 6.3)
  add_classification_head the book's ``out_head = nn.Linear(emb_dim, num_classes)`` (book 6.5)
  partition_params        which params train: last N blocks + final norm + head, all, or head
  classifier_logits       class logits of the last token of each sequence (book 6.5)
  calc_accuracy_loader, calc_loss_batch, calc_loss_loader          (book 6.6)
  classifier_train_step, train_classifier_simple                   (book 6.7)
  classify_review         the label of a new text (book 6.8)

Frozen parameters. The transformer blocks are stacked on a leading layer axis (``nn.scan``), so
"train the last block" cannot be a mask over whole leaves, and a gradient masked after the fact
would still cost the backward pass through every block. Instead :func:`partition_params` cuts
the params into a trainable tree and a frozen tree (the stacked blocks sliced on the layer axis),
the forward pass runs the frozen blocks and then the trainable ones as two scans, and the
gradient is taken with respect to the trainable tree only: no backward pass runs through the
frozen part and the optimizer state covers only what trains.

The classifier runs the model's own ``TransformerBlock`` and ``LayerNorm`` and applies its head
to the last token's hidden state. Only that row is read, so the final block runs with
``last_token=True``: keys and values from every token, the rest of the block for one row.
"""

from __future__ import annotations

import csv
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict

from jaxgpt.config import GPTConfig
from jaxgpt.data import BatchOrder
from jaxgpt.model import GPTModel, LayerNorm, Params, TransformerBlock
from jaxgpt.ops import Linear, keep_mask
from jaxgpt.xla import compiler_options

Array = jax.Array
PAD_TOKEN_ID = 50256  # <|endoftext|>, the book's padding token
HEAD = "out_head"


class ClassifyDataError(ValueError):
    """A labelled-text file or a dataset setting is unusable; the message names the line or setting."""


# --------------------------------------------------------------------------------------------
# Data (book 6.2 and 6.3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledTexts:
    """Texts with integer labels, and where each came from.

    ``labels[i]`` indexes ``label_names``; ``lines[i]`` is the 1-based line of ``texts[i]`` in
    its file, so that later errors (a message too long for the model) can name it.
    """

    texts: tuple[str, ...]
    labels: np.ndarray  # (N,) int32
    label_names: tuple[str, ...]
    lines: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: np.ndarray) -> LabeledTexts:
        """The examples at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        texts = tuple(self.texts[i] for i in index)
        return LabeledTexts(texts, self.labels[index], self.label_names, self.lines[index])

    def counts(self) -> dict[str, int]:
        """Examples per class name."""
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.label_names)}


def _read_tsv(path: Path) -> list[tuple[int, str, str]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if "\t" not in line:
                raise ClassifyDataError(f"{path}, line {n}: no tab; expected label<TAB>text")
            label, text = line.split("\t", 1)
            rows.append((n, label.strip(), text))
    return rows


def _read_csv(path: Path) -> list[tuple[int, str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ClassifyDataError(f"{path}: the file is empty; expected a header line text,label")
        columns = [h.strip().lower() for h in header]
        if "text" not in columns or "label" not in columns:
            raise ClassifyDataError(f"{path}, line 1: header {header} lacks a 'text' and a 'label' column")
        t, lab = columns.index("text"), columns.index("label")
        rows = []
        for row in reader:
            n = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise ClassifyDataError(
                    f"{path}, line {n}: {len(row)} fields where the header has {len(columns)}"
                )
            rows.append((n, row[lab].strip(), row[t]))
    return rows


def read_labeled_texts(path: str | Path, label_names: Sequence[str] | None = None) -> LabeledTexts:
    """Read a labelled-text file: ``label<TAB>text`` lines (``.tsv`` or no suffix) or a ``.csv``
    with a header naming a ``text`` and a ``label`` column (any order and case, so the book's
    ``Label,Text`` CSVs read too).

    A TSV line is split at its first tab and nothing is unquoted: this reads the UCI SMS Spam
    Collection as it is, 5,574 messages (4,827 ham, 747 spam). The book reads it with pandas'
    default CSV quoting, which joins a few lines that hold quote characters into one message
    and reports 4,825 ham. Blank lines are skipped.

    Classes are numbered in ``label_names`` order, by default the sorted label names (ham 0,
    spam 1, as the book maps them); a label outside a given ``label_names`` is an error naming
    its line.
    """
    path = Path(path)
    if not path.is_file():
        raise ClassifyDataError(f"{path}: no such file")
    try:
        rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_tsv(path)
    except UnicodeDecodeError as e:
        raise ClassifyDataError(f"{path}: not UTF-8 text ({e})") from None
    if not rows:
        raise ClassifyDataError(f"{path}: no labelled texts in the file")
    for n, label, _ in rows:
        if not label:
            raise ClassifyDataError(f"{path}, line {n}: empty label")
    names = tuple(sorted({label for _, label, _ in rows})) if label_names is None else tuple(label_names)
    if len(set(names)) != len(names):
        raise ClassifyDataError(f"label names must be distinct, got {list(names)}")
    index = {name: i for i, name in enumerate(names)}
    for n, label, _ in rows:
        if label not in index:
            raise ClassifyDataError(
                f"{path}, line {n}: unknown label {label!r}; expected one of {list(names)}"
            )
    if len(names) < 2:
        raise ClassifyDataError(f"{path}: a classifier needs at least two classes, found {list(names)}")
    return LabeledTexts(
        texts=tuple(text for _, _, text in rows),
        labels=np.array([index[label] for _, label, _ in rows], dtype=np.int32),
        label_names=names,
        lines=np.array([n for n, _, _ in rows], dtype=np.int64),
    )


def balance_classes(data: LabeledTexts, seed: int = 123) -> LabeledTexts:
    """Every class cut down to the size of the smallest (the book's ``create_balanced_dataset``).

    Classes come out in label order; a larger class keeps the examples that pandas'
    ``df.sample(n, random_state=seed)`` picks (``RandomState(seed).permutation(count)[:n]``),
    the smallest keeps all its examples in file order. For the spam data this is the book's
    ham sample followed by all the spam.
    """
    per_class = [np.flatnonzero(data.labels == c) for c in range(len(data.label_names))]
    present = [idx for idx in per_class if len(idx)]
    n = min(len(idx) for idx in present)
    parts = []
    for idx in present:
        if len(idx) > n:
            idx = idx[np.random.RandomState(seed).permutation(len(idx))[:n]]
        parts.append(idx)
    return data.take(np.concatenate(parts))


def random_split(
    data: LabeledTexts, train_frac: float = 0.7, validation_frac: float = 0.1, seed: int = 123
) -> tuple[LabeledTexts, LabeledTexts, LabeledTexts]:
    """(train, validation, test): shuffled with ``seed``, then cut (the book's ``random_split``).

    The shuffle is pandas' ``df.sample(frac=1, random_state=seed)``; the train and validation
    sizes are ``int(N * frac)`` and the test set takes the rest, as in the book.
    """
    if not (0 < train_frac and 0 <= validation_frac and train_frac + validation_frac <= 1):
        raise ClassifyDataError(
            f"split fractions must be positive and sum to at most 1, got {train_frac} and {validation_frac}"
        )
    N = len(data)
    order = np.random.RandomState(seed).permutation(N)
    train_end = int(N * train_frac)
    validation_end = train_end + int(N * validation_frac)
    return (
        data.take(order[:train_end]),
        data.take(order[train_end:validation_end]),
        data.take(order[validation_end:]),
    )


@dataclass(frozen=True)
class ClassificationDataset:
    """Token ids padded to one length, and labels (the book's ``SpamDataset``)."""

    inputs: np.ndarray  # (N, T) int32
    labels: np.ndarray  # (N,) int32
    max_length: int  # T

    def __len__(self) -> int:
        return len(self.labels)


def make_dataset(
    data: LabeledTexts,
    tokenizer: Any,
    max_length: int | None = None,
    context_length: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
    where: str = "",
) -> ClassificationDataset:
    """Tokenize every text and pad it with ``pad_token_id`` on the right (the book's ``SpamDataset``).

    ``max_length`` None: pad to the longest text, which must fit ``context_length`` (else an error
    naming its line). A given ``max_length`` truncates longer texts to it, as the book does for
    its validation and test sets (padded to the training set's length), and must itself fit
    ``context_length``. ``where`` prefixes messages (the file name).
    """
    where = f"{where}, " if where else ""
    encoded = [tokenizer.encode_ordinary(text) for text in data.texts]
    if max_length is None:
        if not encoded:
            raise ClassifyDataError(f"{where}no texts to pad")
        longest = int(np.argmax([len(ids) for ids in encoded]))
        max_length = len(encoded[longest])
        if context_length is not None and max_length > context_length:
            raise ClassifyDataError(
                f"{where}line {int(data.lines[longest])}: the text has {max_length} tokens, longer than "
                f"the model's context of {context_length}; give a max length to truncate to"
            )
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ClassifyDataError(f"max length must be a positive integer, got {max_length!r}")
    elif context_length is not None and max_length > context_length:
        raise ClassifyDataError(
            f"max length {max_length} is longer than the model's context of {context_length}"
        )
    inputs = np.full((len(encoded), max_length), pad_token_id, dtype=np.int32)
    for i, ids in enumerate(encoded):
        ids = ids[:max_length]
        inputs[i, : len(ids)] = ids
    return ClassificationDataset(inputs, np.asarray(data.labels, np.int32), max_length)


@dataclass(frozen=True)
class ClassificationLoader(BatchOrder):
    """Batches ``(inputs (B, T), labels (B,))`` of a dataset (the book's ``DataLoader`` in 6.3).

    The book trains with ``shuffle=True, drop_last=True`` and evaluates with neither. Epoch
    ``e``'s order is a function of ``(seed, e)`` alone (see :class:`jaxgpt.data.BatchOrder`).
    """

    dataset: ClassificationDataset
    batch_size: int = 8
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 123

    def __post_init__(self) -> None:
        self.check_batching()

    @property
    def num_windows(self) -> int:
        return len(self.dataset)

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows in self.batch_indices(epoch, start):  # (B,)
            yield self.dataset.inputs[rows], self.dataset.labels[rows]


# --------------------------------------------------------------------------------------------
# The classification head and which params train (book 6.5)
# --------------------------------------------------------------------------------------------


def add_classification_head(params: Params, cfg: GPTConfig, num_classes: int, key: Array) -> Params:
    """``params`` with the language-model head replaced by a fresh (C, num_classes) head.

    The book's ``model.out_head = torch.nn.Linear(emb_dim, num_classes)``: a kernel and a bias,
    both drawn from PyTorch's default U(-1/sqrt(C), 1/sqrt(C)). The token embedding stays as it
    is (a tied model's embedding no longer doubles as the head).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    C = cfg.emb_dim
    bound = 1.0 / math.sqrt(C)
    k_kernel, k_bias = jax.random.split(key)
    head = {
        "kernel": jax.random.uniform(k_kernel, (C, num_classes), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k_bias, (num_classes,), jnp.float32, -bound, bound),
    }
    return {**{k: v for k, v in params.items() if k != HEAD}, HEAD: head}


def num_classes_of(params: Params) -> int:
    """The number of classes of a classifier's head."""
    return int(params[HEAD]["bias"].shape[0])


_TRAINABLE_RE = re.compile(r"last-(\d+)")


def parse_trainable(spec: str, n_layers: int) -> tuple[int, bool, bool]:
    """``spec`` -> (trainable blocks, final norm trains, embeddings train).

    ``last-block`` (the book's choice) = ``last-1``: the last block, the final norm and the head;
    ``last-N``: the last N blocks, the final norm and the head; ``head``: the head only;
    ``all``: everything.
    """
    if spec == "all":
        return n_layers, True, True
    if spec == "head":
        return 0, False, False
    if spec == "last-block":
        spec = "last-1"
    m = _TRAINABLE_RE.fullmatch(spec)
    if m is None or not 1 <= int(m.group(1)) <= n_layers:
        raise ValueError(
            f"trainable must be last-block, last-N with 1 <= N <= {n_layers}, head or all; got {spec!r}"
        )
    return int(m.group(1)), True, False


def partition_params(params: Params, cfg: GPTConfig, trainable: str = "last-block") -> tuple[Params, Params]:
    """(trainable, frozen): ``params`` cut in two by :func:`parse_trainable`'s rule.

    Both keep the param tree's names. With N of the L blocks training, ``trainable["trf_blocks"]``
    holds layers L-N..L-1 and ``frozen["trf_blocks"]`` layers 0..L-N-1 (each leaf sliced on its
    leading layer axis); a part that is empty is left out. :func:`combine_params` is the inverse.
    """
    n_blocks, norm, emb = parse_trainable(trainable, cfg.n_layers)
    L = cfg.n_layers
    train: Params = {HEAD: params[HEAD]}
    frozen: Params = {}
    for name in ("tok_emb", "pos_emb"):
        (train if emb else frozen)[name] = params[name]
    (train if norm else frozen)["final_norm"] = params["final_norm"]
    blocks = params["trf_blocks"]
    if n_blocks:
        train["trf_blocks"] = jax.tree.map(lambda a: a[L - n_blocks :], blocks)
    if n_blocks < L:
        frozen["trf_blocks"] = jax.tree.map(lambda a: a[: L - n_blocks], blocks)
    return train, frozen


def combine_params(trainable: Params, frozen: Params) -> Params:
    """The whole param tree from :func:`partition_params`' two parts (blocks: frozen layers first)."""
    params = {**frozen, **trainable}
    if "trf_blocks" in trainable and "trf_blocks" in frozen:
        params["trf_blocks"] = jax.tree.map(
            lambda f, t: jnp.concatenate([f, t], axis=0), frozen["trf_blocks"], trainable["trf_blocks"]
        )
    return params


# --------------------------------------------------------------------------------------------
# The forward pass: class logits of the last token
# --------------------------------------------------------------------------------------------

_REMAT = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


def _lora_interceptor(adapters: Params, alpha: float) -> Callable[..., Any]:
    """A Flax method interceptor adding the book's LoRA term ``alpha * (x @ A @ B)`` to the output of
    every ``Linear`` whose path in the module tree (``("att", "W_query")``) has an adapter.

    This is the book's ``LinearWithLoRA.forward``: the frozen kernel is only read, so its
    gradient is never formed, where training the merged kernel (``merge_lora``) would compute a
    full-size kernel gradient per layer and project it onto the adapters.
    """
    table: dict[tuple[str, ...], dict[str, Array]] = {}
    for path, leaf in flatten_dict(adapters).items():  # ("att", "W_query", "A") -> leaf
        table.setdefault(path[:-1], {})[path[-1]] = leaf

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, Linear):
            return y
        ab = table.get(tuple(context.module.path))
        if ab is None:
            return y
        x = args[0]  # (..., in)
        # as (N, in) rows: on 3-D x, XLA's CPU layouts copy the (B, T, out) gradient transposed
        # to contract it for B's gradient (15% of the step at the book's shapes)
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        lora = alpha * (rows @ ab["A"].astype(x.dtype) @ ab["B"].astype(x.dtype))  # (N, out)
        return y + lora.reshape(y.shape).astype(y.dtype)

    return interceptor


def _run_blocks(
    cfg: GPTConfig,
    stacked: Params,
    x: Array,
    first_layer: int,
    deterministic: bool,
    key: Array | None,
    lora: tuple[Params, float] | None = None,
    last_token: bool = False,
) -> Array:
    """x (B, T, C) through the blocks whose params are stacked on axis 0 (layers first_layer, ...);
    ``lora`` = (adapters stacked the same way, alpha) adds the adapters' term to each linear.

    ``last_token=True`` runs the final block for the last token's row only and returns (B, 1, C):
    its keys and values still come from every token, but its queries, output projection and
    feed-forward layers, 5/6 of the block's matmuls, run on one row instead of T.
    """

    def block(x: Array, i: Array, p: Params, ab: Params | None, last: bool = False) -> Array:
        rngs = None if deterministic else {"dropout": jax.random.fold_in(key, i)}
        apply = functools.partial(TransformerBlock(cfg, deterministic).apply, {"params": p}, rngs=rngs)
        if ab is None:
            return apply(x, None, None, None, last)[0]
        with nn.intercept_methods(_lora_interceptor(ab, lora[1])):
            return apply(x, None, None, None, last)[0]

    def body(x: Array, layer: tuple[Array, Params, Params | None]) -> tuple[Array, None]:
        return block(x, *layer), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers = (first_layer + jnp.arange(n), stacked, None if lora is None else lora[0])
    n_scanned = n - 1 if last_token else n
    if n_scanned:
        x, _ = jax.lax.scan(body, x, jax.tree.map(lambda a: a[:n_scanned], layers), unroll=cfg.scan_unroll)
    if last_token:
        x = block(x, *jax.tree.map(lambda a: a[-1], layers), last=True)
    return x


def classifier_logits(
    params: Params,
    cfg: GPTConfig,
    input_batch: Array,
    *,
    frozen: Params | None = None,
    deterministic: bool = True,
    dropout_key: Array | None = None,
    lora: tuple[Params, float] | None = None,
) -> Array:
    """Token ids (B, T) -> class logits (B, num_classes) of each sequence's last token.

    The book's ``model(input_batch)[:, -1, :]`` with the new head. ``params`` is a whole
    classifier, or with ``frozen`` the trainable part of :func:`partition_params`: the frozen
    blocks run first and no gradient flows into them. ``deterministic=False`` turns dropout on
    (needs ``dropout_key``; each layer folds in its index, so the masks do not depend on how the
    params were cut). ``lora`` = (adapters, alpha) of :func:`jaxgpt.lora.init_lora` runs the
    adapted model the book's way, ``x @ W + alpha * (x @ A @ B)`` in each adapted layer (the same
    function as the merged params of :func:`jaxgpt.lora.merge_lora`, differentiated more cheaply).
    """
    frozen = {} if frozen is None else frozen
    adapters = {} if lora is None else lora[0]
    if lora is not None and frozen:
        raise ValueError("LoRA adapters go with whole params, not with a frozen part")
    if not deterministic and dropout_key is None:
        raise ValueError("dropout (deterministic=False) needs a dropout_key")

    def part(name: str) -> Params:
        return params[name] if name in params else frozen[name]

    B, T = input_batch.shape
    if T > cfg.context_length:
        raise ValueError(f"input has {T} tokens but context_length is {cfg.context_length}")
    tok = part("tok_emb")["embedding"]
    pos = part("pos_emb")["embedding"]
    x = tok[input_batch] + pos[:T][None]  # (B, T, C), as GPTModel's tok_emb(idx) + pos_emb(positions)
    if not deterministic and cfg.drop_rate > 0:
        keep = 1.0 - cfg.drop_rate
        mask = keep_mask(jax.random.fold_in(dropout_key, cfg.n_layers), x.shape, keep)  # GPTModel's drop_emb
        x = jnp.where(mask, x / keep, 0.0)
    trees = [tree["trf_blocks"] for tree in (frozen, params) if "trf_blocks" in tree]  # frozen first
    layers = sum(jax.tree.leaves(tree)[0].shape[0] for tree in trees)
    if layers != cfg.n_layers:
        raise ValueError(f"the params hold {layers} transformer blocks, the config {cfg.n_layers}")
    block_lora = None if "trf_blocks" not in adapters else (adapters["trf_blocks"], lora[1])
    layer = 0
    for i, tree in enumerate(trees):  # the last block computes only the last token's row
        x = _run_blocks(cfg, tree, x, layer, deterministic, dropout_key, block_lora, i == len(trees) - 1)
        layer += jax.tree.leaves(tree)[0].shape[0]
    x = x[:, -1, :]  # (B, C): the last token, which has seen the whole text
    x = LayerNorm(cfg.emb_dim).apply({"params": part("final_norm")}, x)  # (B, C)
    head = part(HEAD)
    logits = x @ head["kernel"] + head["bias"][None, :]  # (B, num_classes)
    if HEAD in adapters:
        ab = adapters[HEAD]
        logits = logits + lora[1] * (x @ ab["A"] @ ab["B"])  # the book's LinearWithLoRA
    return logits


def lm_hidden_states(params: Params, cfg: GPTConfig, input_batch: Array) -> Array:
    """The model's own hidden states after the final norm (B, T, C), for checking the classifier's trunk."""
    trunk = {k: v for k, v in params.items() if k != HEAD}
    return GPTModel(cfg).apply({"params": trunk}, input_batch, head=False)


def classifier_from_book_state_dict(
    state_dict: Mapping[str, Any], n_heads: int | None = None
) -> tuple[GPTConfig, Params]:
    """Import the book's chapter-6 classifier (its ``GPTModel`` with ``out_head`` (num_classes, C)
    and a bias) -> (cfg, params). ``state_dict`` maps names to torch tensors or arrays."""
    from jaxgpt.weights import load_book_state_dict

    if "out_head.bias" not in state_dict:
        raise ValueError("not a book classifier state dict: no 'out_head.bias'")
    return load_book_state_dict(state_dict, n_heads=n_heads)


# --------------------------------------------------------------------------------------------
# Loss and accuracy (book 6.6)
# --------------------------------------------------------------------------------------------


def classification_loss(logits: Array, labels: Array) -> Array:
    """Mean cross-entropy of labels (B,) under class logits (B, num_classes), in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


@functools.partial(jax.jit, static_argnames="cfg")
def calc_loss_batch(
    params: Params, cfg: GPTConfig, input_batch: Array, target_batch: Array, frozen: Params | None = None
) -> Array:
    """Mean cross-entropy of the labels (B,) under the last token's logits, dropout off."""
    return classification_loss(classifier_logits(params, cfg, input_batch, frozen=frozen), target_batch)


@functools.partial(jax.jit, static_argnames="cfg")
def _correct(params: Params, cfg: GPTConfig, input_batch: Array, target_batch: Array, frozen: Params | None):
    predicted_labels = jnp.argmax(classifier_logits(params, cfg, input_batch, frozen=frozen), axis=-1)
    return (predicted_labels == target_batch).sum()


def _batches(loader: Any, num_batches: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        yield batch


def calc_accuracy_loader(
    params: Params, cfg: GPTConfig, loader: Any, num_batches: int | None = None, frozen: Params | None = None
) -> float:
    """Fraction of examples whose last-token argmax is the label, over the first ``num_batches``
    batches of ``loader`` (all when None); the book's ``calc_accuracy_loader``."""
    correct, seen = 0, 0
    for input_batch, target_batch in _batches(loader, num_batches):
        correct += int(_correct(params, cfg, jnp.asarray(input_batch), jnp.asarray(target_batch), frozen))
        seen += len(target_batch)
    return correct / seen if seen else math.nan


def calc_loss_loader(
    params: Params, cfg: GPTConfig, loader: Any, num_batches: int | None = None, frozen: Params | None = None
) -> float:
    """Mean of the batch losses over the first ``num_batches`` batches (all when None); NaN for an
    empty loader. The book's ``calc_loss_loader``."""
    total, count = 0.0, 0
    for input_batch, target_batch in _batches(loader, num_batches):
        total += float(
            calc_loss_batch(params, cfg, jnp.asarray(input_batch), jnp.asarray(target_batch), frozen)
        )
        count += 1
    return total / count if count else math.nan


# --------------------------------------------------------------------------------------------
# Training (book 6.7)
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class ClassifierState:
    """What fine-tuning changes, as one pytree: the trainable params and their optimizer state,
    beside the frozen params, the step and the base dropout key (``fold_in(rng, step)`` per step)."""

    trainable: Params
    frozen: Params
    opt_state: optax.OptState
    step: Array  # () int32
    rng: Array  # (2,) uint32
    # None: ``trainable`` is a part of the params (partition_params); a number: ``trainable`` holds
    # LoRA adapters over all of ``frozen``, scaled by this alpha (jaxgpt.lora)
    lora_alpha: float | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def params(self) -> Params:
        """The whole classifier: the blocks joined again, or the adapters merged in."""
        if self.lora_alpha is not None:
            from jaxgpt.lora import merge_lora  # jaxgpt.lora builds on this module

            return merge_lora(self.frozen, self.trainable, self.lora_alpha)
        return combine_params(self.trainable, self.frozen)

    def eval_parts(self) -> tuple[Params, Params | None]:
        """(params, frozen) for the loss and accuracy functions."""
        if self.lora_alpha is not None:
            return self.params, None
        return self.trainable, self.frozen


def make_classifier_optimizer(
    learning_rate: float = 5e-5, weight_decay: float = 0.1
) -> optax.GradientTransformation:
    """The book's ``torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)``.

    It is applied to the trainable part only, so the frozen params have no optimizer state
    (PyTorch's AdamW skips them because their ``grad`` is None).
    """
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def create_classifier_state(
    params: Params,
    cfg: GPTConfig,
    tx: optax.GradientTransformation,
    trainable: str = "last-block",
    seed: int = 123,
) -> ClassifierState:
    """A fresh state for fine-tuning ``params``; which parts train: see :func:`parse_trainable`."""
    train, frozen = partition_params(params, cfg, trainable)
    return ClassifierState(
        trainable=train,
        frozen=frozen,
        opt_state=tx.init(train),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.PRNGKey(seed)),
    )


def classifier_train_step(
    state: ClassifierState, batch: tuple[Array, Array], *, cfg: GPTConfig, tx: optax.GradientTransformation
) -> tuple[ClassifierState, dict[str, Array]]:
    """One AdamW update on a batch (inputs (B, T), labels (B,)) -> (new state, {"loss"}).

    The gradient is taken with respect to ``state.trainable`` only. Dropout is on when
    ``cfg.drop_rate`` > 0 (the book fine-tunes with 0).
    """
    inputs, labels = batch
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(trainable: Params) -> Array:
        logits = classifier_logits(
            trainable, cfg, inputs, frozen=state.frozen, deterministic=cfg.drop_rate == 0, dropout_key=key
        )
        return classification_loss(logits, labels)

    return apply_loss_gradients(state, tx, loss_fn)


def apply_loss_gradients(
    state: ClassifierState, tx: optax.GradientTransformation, loss_fn: Callable[[Params], Array]
) -> tuple[ClassifierState, dict[str, Array]]:
    """One optimizer step of ``state.trainable`` down the gradient of ``loss_fn`` (its only input)."""
    loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return state.replace(trainable=trainable, opt_state=opt_state, step=state.step + 1), {"loss": loss}


@functools.lru_cache(maxsize=8)
def jit_classifier_train_step(
    cfg: GPTConfig, tx: optax.GradientTransformation
) -> Callable[[ClassifierState, tuple[Array, Array]], tuple[ClassifierState, dict[str, Array]]]:
    """:func:`classifier_train_step` with ``cfg`` and ``tx`` bound, jitted once."""
    step = functools.partial(classifier_train_step, cfg=cfg, tx=tx)
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options(training=True))


@dataclass
class ClassifierHistory:
    """What :func:`train_classifier_simple` returns besides the state (the book's five lists)."""

    train_losses: list[float]
    val_losses: list[float]
    train_accs: list[float]
    val_accs: list[float]
    examples_seen: int = 0
    epochs_done: int = 0

    @classmethod
    def empty(cls) -> ClassifierHistory:
        return cls([], [], [], [], 0, 0)


def evaluate_classifier(
    state: ClassifierState, cfg: GPTConfig, train_loader: Any, val_loader: Any, eval_iter: int
) -> tuple[float, float]:
    """(train loss, validation loss), at most ``eval_iter`` batches each (the book's ``evaluate_model``)."""
    params, frozen = state.eval_parts()
    return (
        calc_loss_loader(params, cfg, train_loader.iter_epoch(0), eval_iter, frozen=frozen),
        calc_loss_loader(params, cfg, val_loader.iter_epoch(0), eval_iter, frozen=frozen),
    )


def train_classifier_simple(
    state: ClassifierState,
    tx: optax.GradientTransformation,
    cfg: GPTConfig,
    train_loader: BatchOrder,
    val_loader: BatchOrder,
    num_epochs: int,
    eval_freq: int = 50,
    eval_iter: int = 5,
    history: ClassifierHistory | None = None,
    print_fn: Callable[[str], None] | None = print,
    on_epoch_end: Callable[[ClassifierState, ClassifierHistory], None] | None = None,
) -> tuple[ClassifierState, ClassifierHistory]:
    """The book's ``train_classifier_simple``: ``num_epochs`` epochs, the losses every ``eval_freq``
    steps and the accuracies after each epoch, over ``eval_iter`` batches, printed as the book does.

    Epoch ``e`` reads ``train_loader.iter_epoch(e)``. Given the ``history`` of an earlier call (as
    a checkpoint keeps it), training continues at epoch ``history.epochs_done`` and takes exactly
    the steps an uninterrupted run takes. ``on_epoch_end(state, history)`` runs after each epoch
    (checkpoints, plots).
    """
    history = ClassifierHistory.empty() if history is None else history
    say = print_fn or (lambda _: None)
    if state.lora_alpha is None:
        step_fn = jit_classifier_train_step(cfg, tx)
    else:
        from jaxgpt.lora import jit_lora_train_step

        step_fn = jit_lora_train_step(cfg, tx, state.lora_alpha)
    global_step = int(state.step) - 1
    for epoch in range(history.epochs_done, num_epochs):
        for input_batch, target_batch in train_loader.iter_epoch(epoch):
            state, _ = step_fn(state, (jnp.asarray(input_batch), jnp.asarray(target_batch)))
            history.examples_seen += len(input_batch)
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_classifier(state, cfg, train_loader, val_loader, eval_iter)
                history.train_losses.append(train_loss)
                history.val_losses.append(val_loss)
                say(
                    f"Ep {epoch + 1} (Step {global_step:06d}): "
                    f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                )
        params, frozen = state.eval_parts()
        train_accuracy = calc_accuracy_loader(
            params, cfg, train_loader.iter_epoch(0), eval_iter, frozen=frozen
        )
        val_accuracy = calc_accuracy_loader(params, cfg, val_loader.iter_epoch(0), eval_iter, frozen=frozen)
        say(
            f"Training accuracy: {train_accuracy * 100:.2f}% | Validation accuracy: {val_accuracy * 100:.2f}%"
        )
        history.train_accs.append(train_accuracy)
        history.val_accs.append(val_accuracy)
        history.epochs_done = epoch + 1
        if on_epoch_end is not None:
            on_epoch_end(state, history)
    return state, history


# --------------------------------------------------------------------------------------------
# New text (book 6.8)
# --------------------------------------------------------------------------------------------


def classify_review(
    text: str,
    params: Params,
    cfg: GPTConfig,
    max_length: int | None = None,
    label_names: Sequence[str] | None = None,
    tokenizer: Any = None,
    pad_token_id: int = PAD_TOKEN_ID,
) -> str | int:
    """The predicted class of ``text``: its name from ``label_names``, else its index.

    As the book's ``classify_review``: the text is truncated to ``max_length`` tokens and padded
    to it (the length the classifier was trained at); None: neither padded nor truncated
    beyond the context.
    """
    if tokenizer is None:
        from jaxgpt.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    if max_length is not None and max_length > cfg.context_length:
        raise ValueError(
            f"max_length {max_length} is longer than the model's context of {cfg.context_length}"
        )
    input_ids = tokenizer.encode_ordinary(text)
    length = cfg.context_length if max_length is None else max_length
    input_ids = input_ids[:length]
    if max_length is not None:
        input_ids += [pad_token_id] * (max_length - len(input_ids))
    if not input_ids:
        raise ValueError("cannot classify an empty text")
    logits = classifier_logits(params, cfg, jnp.asarray([input_ids], jnp.int32))  # (1, num_classes)
    predicted_label = int(jnp.argmax(logits, axis=-1)[0])
    return label_names[predicted_label] if label_names is not None else predicted_label
