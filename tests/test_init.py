"""GPTConfig.init="book": jaxgpt draws its params as PyTorch initialises the book's GPTModel.

Each tensor's statistics are compared with those of the book's own ``GPTModel`` (PyTorch's
default initialisation) for the same config: mean, spread and tails within sampling error of the
two draws, and the uniform tensors inside the bound ``1/sqrt(in_features)`` read from the torch
module. The expected values come from PyTorch, never from jaxgpt.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import GPTConfig, get_config
from jaxgpt.model import GPTModel, init_params

torch = pytest.importorskip("torch")
book_ch04 = pytest.importorskip("llms_from_scratch.ch04")

# Small, but with tensors large enough that their statistics say something.
CFG = GPTConfig(
    vocab_size=1000, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True,
    tie_embeddings=False, init="book",
)  # fmt: skip
Z = 6.0  # tolerances in standard errors: a false failure is rarer than 1 in 10^8 per statistic


def _book_config(cfg: GPTConfig) -> dict:
    names = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
    return {name: getattr(cfg, name) for name in names}


def _book_model(cfg: GPTConfig, seed: int):
    torch.manual_seed(seed)
    return book_ch04.GPTModel(_book_config(cfg))


def _jax_tensor(params: dict, book_name: str) -> np.ndarray:
    """The jaxgpt tensor holding the book's ``book_name``, in the book's (out, in) layout."""
    parts = book_name.replace("layers.0", "layers_0").replace("layers.2", "layers_2").split(".")
    layer = None
    if parts[0] == "trf_blocks":
        layer, parts = int(parts[1]), ["trf_blocks", *parts[2:]]
    leaf = parts[-1]
    if leaf == "weight":
        leaf = "embedding" if parts[0] in ("tok_emb", "pos_emb") else "kernel"
    node = params
    for p in [*parts[:-1], leaf]:
        node = node[p]
    value = np.asarray(node if layer is None else node[layer])
    return value.T if leaf == "kernel" else value


def _moments(x: np.ndarray) -> tuple[float, float, float]:
    x = x.astype(np.float64).ravel()
    mean, std = x.mean(), x.std()
    kurtosis = ((x - mean) ** 4).mean() / std**4
    return mean, std, kurtosis


@pytest.fixture(scope="module")
def book_model():
    return _book_model(CFG, seed=123)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_every_tensor_of_the_book_model_has_its_statistics(book_model, params):
    random_tensors = 0
    for name, t in book_model.named_parameters():  # the state dict also holds the causal masks
        ours, theirs = _jax_tensor(params, name), t.detach().numpy()
        assert ours.shape == theirs.shape, name
        if theirs.std() == 0:  # LayerNorm's scale and shift: constants, compared exactly below
            continue
        random_tensors += 1
        n = theirs.size
        (m_o, s_o, k_o), (m_t, s_t, k_t) = _moments(ours), _moments(theirs)
        # two independent samples of n from one distribution: standard errors of the difference
        se_mean = s_t * math.sqrt(2 / n)
        se_std = s_t * math.sqrt(2 * (k_t - 1) / (4 * n))
        assert abs(m_o - m_t) < Z * se_mean, f"{name}: mean {m_o:.4g} vs the book's {m_t:.4g}"
        assert abs(s_o - s_t) < Z * se_std, f"{name}: std {s_o:.4g} vs the book's {s_t:.4g}"
        if n >= 4000:  # normal (kurtosis 3) and uniform (1.8) are told apart; se ~ sqrt(24 / n)
            assert abs(k_o - k_t) < Z * math.sqrt(2 * 24 / n), f"{name}: kurtosis {k_o:.3f} vs {k_t:.3f}"
    # 2 embeddings + out_head + per layer: 4 attention Linears and 2 feed-forward ones, each with a bias
    assert random_tensors == 3 + CFG.n_layers * 12


def test_linear_weights_and_biases_lie_within_one_over_sqrt_fan_in(book_model, params):
    linears = [(n, m) for n, m in book_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 + CFG.n_layers * 6
    for name, module in linears:
        bound = 1 / math.sqrt(module.in_features)
        for kind in ("weight", "bias"):
            if getattr(module, kind) is None:
                continue
            theirs = getattr(module, kind).detach().numpy()
            ours = _jax_tensor(params, f"{name}.{kind}")
            assert np.abs(theirs).max() <= bound  # PyTorch's bound, as documented
            assert np.abs(ours).max() <= bound, f"{name}.{kind} leaves [-{bound:.4g}, {bound:.4g}]"
            # n uniform draws all stay below (1 - t) * bound with probability (1 - t)^n: 1e-9 here
            t = 1 - math.exp(math.log(1e-9) / ours.size)
            assert np.abs(ours).max() > (1 - t) * bound, f"{name}.{kind} does not fill its interval"


def test_embeddings_are_standard_normal(params):
    # nn.Embedding's N(0, 1): about 0.27% of the draws lie beyond 3 standard deviations
    emb = np.asarray(params["tok_emb"]["embedding"])
    beyond = (np.abs(emb) > 3).mean()
    p = 0.0027
    assert abs(beyond - p) < Z * math.sqrt(p * (1 - p) / emb.size)


def test_norms_heads_and_biases_are_the_books(book_model, params):
    state = dict(book_model.named_parameters())
    for name, t in state.items():
        if name.endswith((".scale", ".shift")):
            np.testing.assert_array_equal(_jax_tensor(params, name), t.detach().numpy(), err_msg=name)
    # a separate head without bias, as the book's out_head
    assert "out_head.bias" not in state and set(params["out_head"]) == {"kernel"}
    assert params["out_head"]["kernel"].shape == (CFG.emb_dim, CFG.vocab_size)
    # the query/key/value projections have a bias exactly when qkv_bias says so
    for qkv_bias in (True, False):
        cfg = CFG.replace(qkv_bias=qkv_bias)
        book_names = {name for name, _ in _book_model(cfg, 0).named_parameters()}
        att = init_params(cfg, jax.random.key(1))["trf_blocks"]["att"]
        for proj in ("W_query", "W_key", "W_value", "out_proj"):
            assert ("bias" in att[proj]) == (f"trf_blocks.0.att.{proj}.bias" in book_names), (proj, qkv_bias)


def test_draws_are_independent_per_layer_and_a_function_of_the_key(params):
    kernel = np.asarray(params["trf_blocks"]["att"]["W_query"]["kernel"])
    assert not np.array_equal(kernel[0], kernel[1])
    again = init_params(CFG, jax.random.key(0))
    other = init_params(CFG, jax.random.key(1))
    for a, b, c in zip(*(jax.tree_util.tree_leaves(p) for p in (params, again, other)), strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.asarray(c).std() == 0 or not np.array_equal(a, c)


def test_initial_logits_spread_like_the_book_models():
    # The head's scale decides the first loss; average over a few seeds on each side.
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(4, 32))
    ours, theirs = [], []
    for seed in range(4):
        p = init_params(CFG, jax.random.key(seed))
        ours.append(float(GPTModel(CFG).apply({"params": p}, jnp.asarray(ids)).std()))
        model = _book_model(CFG, seed).eval()
        with torch.no_grad():
            theirs.append(float(model(torch.as_tensor(ids)).std()))
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.1 * np.mean(theirs), (ours, theirs)


def test_vocabulary_padding_stays_zero_and_a_tied_head_uses_the_normal_embedding():
    cfg = CFG.replace(vocab_pad_multiple=64)  # 1000 -> 1024 rows
    params = init_params(cfg, jax.random.key(0))
    emb, head = np.asarray(params["tok_emb"]["embedding"]), np.asarray(params["out_head"]["kernel"])
    assert emb.shape == (1024, CFG.emb_dim) and head.shape == (CFG.emb_dim, 1024)
    assert not emb[1000:].any() and not head[:, 1000:].any()
    assert abs(emb[:1000].std() - 1) < 0.05
    tied = init_params(CFG.replace(tie_embeddings=True), jax.random.key(0))
    assert "out_head" not in tied and abs(float(tied["tok_emb"]["embedding"].std()) - 1) < 0.05


def test_gpt2_init_is_unchanged_and_book_preset_uses_the_book_init():
    gpt2 = init_params(CFG.replace(init="gpt2"), jax.random.key(0))
    assert abs(float(gpt2["trf_blocks"]["att"]["W_query"]["kernel"].std()) - 0.02) < 0.002
    assert not np.asarray(gpt2["trf_blocks"]["att"]["out_proj"]["bias"]).any()
    assert get_config("book-124m").init == "book"
