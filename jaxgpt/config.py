"""Model configuration: one frozen dataclass with the book's field names, plus presets.

This module imports nothing else from jaxgpt, so every other module may depend on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

_C = TypeVar("_C", bound="FrozenConfig")

_DTYPES = ("float32", "bfloat16")
_REMAT_POLICIES = ("none", "full", "dots")
_INITS = ("gpt2", "book")


class FrozenConfig:
    """What every frozen config dataclass of jaxgpt shares: ``replace`` and a dict round trip."""

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class GPTConfig(FrozenConfig):
    """Hyper-parameters of the GPT model (the book's ``GPT_CONFIG_124M`` as a frozen dataclass).

    The first seven fields carry the book's names and meanings (chapter 4.1). The rest are
    explicit options the book does not have; their defaults reproduce GPT-2.
    """

    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    context_length: int = 1024  # longest input the positional embedding covers
    emb_dim: int = 768  # C: width of the residual stream
    n_heads: int = 12  # attention heads per layer
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.1  # dropout on embeddings, attention weights and shortcut paths
    qkv_bias: bool = False  # bias in the query/key/value projections (GPT-2 weights have it)

    # --- options beyond the book ---
    tie_embeddings: bool = True  # logits head shares the token embedding (GPT-2); False = book's out_head
    norm_first: bool = True  # Pre-LN blocks as in GPT-2; False = the original Transformer's Post-LN
    dtype: str = "float32"  # compute dtype of matmuls; params and optimizer stay float32
    # dtype of the activations inside each block's attention and feed-forward branches. bfloat16
    # (needs dtype="bfloat16"): the matmuls write bf16, halving the bytes the elementwise work and
    # the stored activations move; LayerNorm, softmax and GELU still compute in float32, and the
    # residual stream, the logits and the loss stay float32 (as under PyTorch's bf16 autocast)
    activation_dtype: str = "float32"
    # recompute in the backward pass instead of storing: none | full (each block) | dots (keep the
    # matmul outputs, recompute the elementwise work: the fastest bfloat16 setting on CPU)
    remat: str = "none"
    scan_unroll: int = 1  # layers per step of the scan over blocks (n_layers = fully unrolled)
    # round the embedding table and the logits head up to a multiple of this many rows (64: 50304
    # for GPT-2, nanoGPT's GPU-friendly size). The extra rows are zero, their logits are never
    # seen (sliced off, or -inf in the loss), and exported weights drop them: results are unchanged.
    vocab_pad_multiple: int = 1
    # how init_params draws the weights: "gpt2" (GPT-2's N(0, 0.02), zero biases) or "book"
    # (PyTorch's defaults, as the book's GPTModel starts: see jaxgpt/init.py and docs/init.md)
    init: str = "gpt2"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= float(self.drop_rate) < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"GPTConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.activation_dtype not in _DTYPES:
            raise ValueError(
                f"GPTConfig.activation_dtype must be one of {_DTYPES}, got {self.activation_dtype!r}"
            )
        if self.activation_dtype == "bfloat16" and self.dtype != "bfloat16":
            raise ValueError(
                "GPTConfig.activation_dtype='bfloat16' needs dtype='bfloat16' (bf16 matmuls), "
                f"got dtype={self.dtype!r}"
            )
        unroll = self.scan_unroll
        if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
            raise ValueError(f"GPTConfig.scan_unroll must be a positive integer, got {self.scan_unroll!r}")
        pad = self.vocab_pad_multiple
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 1:
            raise ValueError(
                f"GPTConfig.vocab_pad_multiple must be a positive integer (1 = no padding), got {pad!r}"
            )
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f"GPTConfig.remat must be one of {_REMAT_POLICIES}, got {self.remat!r}")
        if self.init not in _INITS:
            raise ValueError(f"GPTConfig.init must be one of {_INITS}, got {self.init!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``emb_dim // n_heads``."""
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table (and columns of the head): ``vocab_size`` rounded up to a
        multiple of ``vocab_pad_multiple``; the logits the model returns are ``vocab_size`` wide."""
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m


# The book's model sizes (chapter 4.6 and the table in 5.5). Presets follow the book's settings
# (qkv_bias=False, dropout 0.1); loading pretrained GPT-2 weights switches qkv_bias on. The gpt2-*
# presets are GPT-2's variant (tied head, N(0, 0.02) weights); book-124m is the book's own model.
PRESETS: dict[str, GPTConfig] = {
    # the book's GPT_CONFIG_124M as chapter 5 trains it: context 256, a separate out_head, and
    # PyTorch's default initialisation. GPT-2's init stalls on the book's small text (docs/init.md).
    "book-124m": GPTConfig(context_length=256, tie_embeddings=False, init="book"),
    "gpt2-small": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),  # 1558M
    # Trains to a useful loss in minutes on two CPU cores. The 50257 x emb_dim logits head costs
    # most of each step there, so the width stays small; a sweep at a fixed token budget found two
    # layers of width 128 better than four of 128 or any depth at 64 to 256 (see scripts/train.py).
    "quickstart": GPTConfig(context_length=128, emb_dim=128, n_heads=4, n_layers=2),
}


def get_config(name: str, **overrides: Any) -> GPTConfig:
    """The preset called ``name`` with ``overrides`` applied.

    ``get_config("book-124m")`` is the book's ``GPT_CONFIG_124M`` as chapter 5 trains it.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def backend_defaults(backend: str, n_layers: int) -> dict[str, Any]:
    """The ``GPTConfig`` fields the command-line tools set on ``backend`` unless the user sets them.

    On a CPU: nothing, so the book's float32 (bf16 is one flag away). On a GPU: bf16 matmuls and
    activations, and the blocks unrolled (``scan_unroll=n_layers``). gpt2-small, context 1024,
    batch 64 on an H200: 314k tokens/s in float32 activations with the blocks scanned, 331k with
    bf16 activations, 441-446k unrolled as well, for a 27-30 s compile instead of 7-9 s (478k at
    batch 192 in scripts/gpu_bench.sh, a later version). On a TPU: bf16 matmuls and activations
    (not measured here).
    """
    if backend == "gpu":
        return {"dtype": "bfloat16", "activation_dtype": "bfloat16", "scan_unroll": n_layers}
    if backend == "tpu":
        return {"dtype": "bfloat16", "activation_dtype": "bfloat16"}
    return {}
