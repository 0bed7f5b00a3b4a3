"""Weights in other layouts <-> jaxgpt params: the one module that knows external tensor names.

jaxgpt's param tree uses the book's names and flax's (in, out) kernels, with the transformer
blocks stacked on a leading layer axis L (they run under ``nn.scan``)::

    tok_emb/embedding (V, C)           pos_emb/embedding (context_length, C)
    trf_blocks/norm1/{scale,shift} (L, C)
    trf_blocks/att/{W_query,W_key,W_value}/kernel (L, C, C)   [+ bias (L, C) when qkv_bias]
    trf_blocks/att/out_proj/{kernel (L, C, C), bias (L, C)}
    trf_blocks/norm2/{scale,shift} (L, C)
    trf_blocks/ff/layers_0/{kernel (L, C, 4C), bias (L, 4C)}
    trf_blocks/ff/layers_2/{kernel (L, 4C, C), bias (L, C)}
    final_norm/{scale,shift} (C,)      out_head/kernel (C, V), only when tie_embeddings=False

With ``GPTConfig.vocab_pad_multiple`` > 1 the V axis of ``tok_emb`` and ``out_head`` is padded
(zeros) to ``padded_vocab_size`` inside jaxgpt; files always hold exactly ``vocab_size`` entries.

An external layout is described by a :class:`Layout`: a key table from its tensor names to
these paths, the set of its tensors stored transposed, and the fused query/key/value tensors
it splits. Import and export are written once against that description and check every name
and shape. Two layouts exist: Hugging Face GPT-2 and the book's PyTorch ``GPTModel``. transformers
is never imported here (Hugging Face files are read with ``safetensors``' NumPy API), and torch
only to read or write a book ``.pth`` file.

:func:`load` is the one entry point for reading a model: it recognises what a path is (a
training run, a Hugging Face directory, a book ``.pth``, OpenAI's TensorFlow directory, or a GPT-2
name fetched through ``jaxgpt.pretrained``; :data:`SOURCES` lists them) and refuses
weights holding NaN or infinite values. Files are written atomically, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgpt.config import GPTConfig
from jaxgpt.ops import pad_vocab

Params = dict[str, Any]
ParamPath = tuple[str, ...]

_QKV = ("W_query", "W_key", "W_value")  # the order in which fused projections concatenate them


def _block_shapes(cfg: GPTConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Shape of each leaf under ``trf_blocks`` for one layer (without the stacked L axis)."""
    C = cfg.emb_dim
    shapes: dict[ParamPath, tuple[int, ...]] = {
        ("norm1", "scale"): (C,),
        ("norm1", "shift"): (C,),
        ("att", "out_proj", "kernel"): (C, C),
        ("att", "out_proj", "bias"): (C,),
        ("norm2", "scale"): (C,),
        ("norm2", "shift"): (C,),
        ("ff", "layers_0", "kernel"): (C, 4 * C),
        ("ff", "layers_0", "bias"): (4 * C,),
        ("ff", "layers_2", "kernel"): (4 * C, C),
        ("ff", "layers_2", "bias"): (C,),
    }
    for name in _QKV:
        shapes[("att", name, "kernel")] = (C, C)
        if cfg.qkv_bias:
            shapes[("att", name, "bias")] = (C,)
    return shapes


def _top_shapes(cfg: GPTConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Shape of each leaf outside ``trf_blocks``."""
    C, V = cfg.emb_dim, cfg.vocab_size
    shapes: dict[ParamPath, tuple[int, ...]] = {
        ("tok_emb", "embedding"): (V, C),
        ("pos_emb", "embedding"): (cfg.context_length, C),
        ("final_norm", "scale"): (C,),
        ("final_norm", "shift"): (C,),
    }
    if not cfg.tie_embeddings:
        shapes[("out_head", "kernel")] = (C, V)
    return shapes


@dataclass(frozen=True)
class Layout:
    """How an external checkpoint names and stores the GPT-2 tensors.

    ``top`` and ``head`` map external names to top-level param paths; ``block`` maps the part
    of a per-layer name after ``block_prefix.format(i=layer)`` to a path under ``trf_blocks``.
    ``fused_qkv`` names per-layer tensors holding [query | key | value] along their last axis
    and says which leaf (``kernel`` or ``bias``) they split into. Names in ``transposed`` hold
    a matrix as (out, in), the transpose of a flax kernel. ``key_prefix`` is written before
    every name but the head's and is optional on reading; names ending in one of ``ignored``
    are buffers, not weights, and are skipped.
    """

    top: Mapping[str, ParamPath]
    block: Mapping[str, ParamPath]
    block_prefix: str
    head: str
    fused_qkv: Mapping[str, str] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()
    key_prefix: str = ""
    ignored: tuple[str, ...] = ()

    def expected_shapes(self, cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
        """Name (without ``key_prefix``) -> stored shape of every external tensor a ``cfg`` model has."""
        top, block = _top_shapes(cfg), _block_shapes(cfg)
        C = cfg.emb_dim
        per_layer = {name: block[path] for name, path in self.block.items()}
        for name, leaf in self.fused_qkv.items():
            per_layer[name] = (C, 3 * C) if leaf == "kernel" else (3 * C,)
        per_layer = {name: self.stored_shape(name, shape) for name, shape in per_layer.items()}
        shapes = {name: self.stored_shape(name, top[path]) for name, path in self.top.items()}
        for i in range(cfg.n_layers):
            prefix = self.block_prefix.format(i=i)
            shapes.update({prefix + name: shape for name, shape in per_layer.items()})
        if not cfg.tie_embeddings:
            shapes[self.head] = self.stored_shape(self.head, top[("out_head", "kernel")])
        return shapes

    def name_of(self, path: ParamPath) -> str:
        """The external name of a top-level param path."""
        return next(name for name, p in self.top.items() if p == path)

    def stored_shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """How the table entry ``key`` stores a param of (flax) ``shape``."""
        return tuple(reversed(shape)) if key in self.transposed else shape

    def strip_prefix(self, name: str) -> str:
        return name[len(self.key_prefix) :] if self.key_prefix and name.startswith(self.key_prefix) else name

    def add_prefix(self, name: str) -> str:
        return name if name == self.head else self.key_prefix + name


# Hugging Face GPT2LMHeadModel. Its Conv1D layers store weights as (in, out), like flax kernels,
# so only the nn.Linear head is transposed. `attn.bias` / `attn.masked_bias` are the causal-mask
# buffers older transformers versions saved with the weights.
HF_GPT2 = Layout(
    top={
        "wte.weight": ("tok_emb", "embedding"),
        "wpe.weight": ("pos_emb", "embedding"),
        "ln_f.weight": ("final_norm", "scale"),
        "ln_f.bias": ("final_norm", "shift"),
    },
    block={
        "ln_1.weight": ("norm1", "scale"),
        "ln_1.bias": ("norm1", "shift"),
        "attn.c_proj.weight": ("att", "out_proj", "kernel"),
        "attn.c_proj.bias": ("att", "out_proj", "bias"),
        "ln_2.weight": ("norm2", "scale"),
        "ln_2.bias": ("norm2", "shift"),
        "mlp.c_fc.weight": ("ff", "layers_0", "kernel"),
        "mlp.c_fc.bias": ("ff", "layers_0", "bias"),
        "mlp.c_proj.weight": ("ff", "layers_2", "kernel"),
        "mlp.c_proj.bias": ("ff", "layers_2", "bias"),
    },
    block_prefix="h.{i}.",
    head="lm_head.weight",
    fused_qkv={"attn.c_attn.weight": "kernel", "attn.c_attn.bias": "bias"},
    transposed=frozenset({"lm_head.weight"}),
    key_prefix="transformer.",
    ignored=(".attn.bias", ".attn.masked_bias"),
)


def _shape_error(name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> ValueError:
    return ValueError(f"tensor {name!r} has shape {tuple(got)}, expected {tuple(expected)}")


def _normalise(state: Mapping[str, Any], layout: Layout) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Drop buffers and the optional key prefix; also return each name's original spelling."""
    tensors, original = {}, {}
    for key, value in state.items():
        name = layout.strip_prefix(key)
        if name.endswith(layout.ignored):
            continue
        if name in tensors:
            raise ValueError(f"tensor {key!r} appears both with and without the {layout.key_prefix!r} prefix")
        tensors[name], original[name] = np.asarray(value), key
    return tensors, original


def _check_names_and_shapes(
    tensors: Mapping[str, np.ndarray], original: Mapping[str, str], layout: Layout, cfg: GPTConfig
) -> None:
    expected = layout.expected_shapes(cfg)
    missing = [layout.add_prefix(n) for n in expected if n not in tensors]
    if missing:
        details = ", ".join(f"{n} {expected[layout.strip_prefix(n)]}" for n in missing)
        raise ValueError(f"missing tensors (name and expected shape): {details}")
    unexpected = [original[n] for n in tensors if n not in expected]
    if unexpected:
        raise ValueError(f"unexpected tensors for this config: {', '.join(unexpected)}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise _shape_error(original[name], tensors[name].shape, shape)


def _import(state: Mapping[str, Any], cfg: GPTConfig, layout: Layout) -> Params:
    """External tensors -> jaxgpt params, every name and shape checked first."""
    tensors, original = _normalise(state, layout)
    if cfg.tie_embeddings and layout.head in tensors:
        # A tied model's file may still carry the head; accept it only if it is the embedding.
        head, emb_name = tensors.pop(layout.head), layout.name_of(("tok_emb", "embedding"))
        if emb_name in tensors and not np.array_equal(head, tensors[emb_name]):
            raise ValueError(f"{layout.head!r} differs from {emb_name!r}: load it with tie_embeddings=False")
    _check_names_and_shapes(tensors, original, layout, cfg)

    def read(key: str, prefix: str = "") -> np.ndarray:
        """The tensor of table entry ``key`` (in layer ``prefix``) as a float32 flax-layout array."""
        value = tensors[prefix + key].astype(np.float32)
        return value.T if key in layout.transposed else value

    flat: dict[ParamPath, np.ndarray] = {path: read(key) for key, path in layout.top.items()}
    if not cfg.tie_embeddings:
        flat[("out_head", "kernel")] = read(layout.head)

    layers: list[dict[ParamPath, np.ndarray]] = []
    for i in range(cfg.n_layers):
        prefix = layout.block_prefix.format(i=i)
        layer = {path: read(key, prefix) for key, path in layout.block.items()}
        for name, leaf in layout.fused_qkv.items():
            parts = np.split(read(name, prefix), 3, axis=-1)
            if leaf == "bias" and not cfg.qkv_bias:
                if np.any(parts[0]) or np.any(parts[1]) or np.any(parts[2]):
                    raise ValueError(f"{original[prefix + name]!r} is not zero: load it with qkv_bias=True")
                continue
            layer.update({("att", proj, leaf): part for proj, part in zip(_QKV, parts, strict=True)})
        layers.append(layer)
    for path in layers[0]:
        flat[("trf_blocks", *path)] = np.stack([layer[path] for layer in layers])  # (L, ...)
    _pad_vocab(flat, cfg)
    return jax.tree_util.tree_map(jnp.asarray, unflatten_dict(flat))


# The vocabulary axis of the embedding table and of the untied head. A padded model (see
# GPTConfig.vocab_pad_multiple) holds padded_vocab_size entries there; files hold vocab_size.
_VOCAB_AXIS: dict[ParamPath, int] = {("tok_emb", "embedding"): 0, ("out_head", "kernel"): 1}


def _pad_vocab(flat: dict[ParamPath, Any], cfg: GPTConfig) -> None:
    """Append the padding entries (zeros) to the vocabulary axis, in place."""
    if cfg.padded_vocab_size == cfg.vocab_size:
        return
    for path, axis in _VOCAB_AXIS.items():
        if path in flat:
            flat[path] = pad_vocab(flat[path], cfg.padded_vocab_size, axis)


def _strip_vocab_padding(flat: dict[ParamPath, np.ndarray], cfg: GPTConfig) -> None:
    """Drop the padding entries of the vocabulary axis, in place, after checking there are as many."""
    if cfg.padded_vocab_size == cfg.vocab_size:
        return
    for path, axis in _VOCAB_AXIS.items():
        if path not in flat:
            continue
        if flat[path].shape[axis] != cfg.padded_vocab_size:
            raise ValueError(
                f"{'/'.join(path)} has {flat[path].shape[axis]} vocabulary entries, but the config "
                f"pads vocab_size={cfg.vocab_size} to {cfg.padded_vocab_size} (vocab_pad_multiple="
                f"{cfg.vocab_pad_multiple}); export with the config the params were made with"
            )
        flat[path] = np.take(flat[path], np.arange(cfg.vocab_size), axis=axis)


def _export(params: Params, cfg: GPTConfig, layout: Layout) -> dict[str, np.ndarray]:
    """jaxgpt params -> external tensors (NumPy, C-contiguous), every shape checked."""
    flat = {path: np.asarray(value) for path, value in flatten_dict(params).items()}
    _strip_vocab_padding(flat, cfg)
    expected_paths = set(_top_shapes(cfg)) | {("trf_blocks", *p) for p in _block_shapes(cfg)}
    if set(flat) != expected_paths:
        missing = sorted("/".join(p) for p in expected_paths - set(flat))
        unexpected = sorted("/".join(p) for p in set(flat) - expected_paths)
        raise ValueError(f"params do not match the config: missing {missing}, unexpected {unexpected}")

    def write(key: str, value: np.ndarray, prefix: str = "") -> None:
        """Store a flax-layout array as table entry ``key`` (in layer ``prefix``)."""
        value = value.T if key in layout.transposed else value
        out[layout.add_prefix(prefix + key)] = np.ascontiguousarray(value)

    out: dict[str, np.ndarray] = {}
    for key, path in layout.top.items():
        write(key, flat[path])
    for i in range(cfg.n_layers):
        prefix = layout.block_prefix.format(i=i)
        for key, path in layout.block.items():
            write(key, flat[("trf_blocks", *path)][i], prefix)
        for key, leaf in layout.fused_qkv.items():
            if leaf == "bias" and not cfg.qkv_bias:  # the external layout always has one: zeros
                fused = np.zeros((3 * cfg.emb_dim,), np.float32)
            else:
                fused = np.concatenate([flat[("trf_blocks", "att", proj, leaf)][i] for proj in _QKV], axis=-1)
            write(key, fused, prefix)
    if not cfg.tie_embeddings:
        write(layout.head, flat[("out_head", "kernel")])

    for name, shape in layout.expected_shapes(cfg).items():
        stored = out[layout.add_prefix(name)]
        if stored.shape != shape:
            raise _shape_error(layout.add_prefix(name), stored.shape, shape)
    return out


# ----------------------------------------------------------------------------- classifiers (book chapter 6)


def classifier_classes(params: Params) -> int | None:
    """The number of classes when ``params`` end in a classification head (the book's chapter 6
    ``out_head = nn.Linear(emb_dim, num_classes)``: a kernel (C, K) and a bias (K,)), else None.

    A language-model head has no bias, so the bias is what tells them apart.
    """
    head = params.get("out_head") if isinstance(params, Mapping) else None
    if isinstance(head, Mapping) and "bias" in head:
        return int(np.shape(head["bias"])[0])
    return None


def not_a_language_model(params: Params, what: str | Path = "the model") -> str | None:
    """A one-line reason why ``params`` cannot serve as a language model (a classifier), or None."""
    classes = classifier_classes(params)
    if classes is None:
        return None
    return (
        f"{what} is a {classes}-class classifier, not a language model; "
        "use finetune_classifier.py --out RUN --classify TEXT"
    )


def _lm_part(params: Params, cfg: GPTConfig) -> tuple[Params, GPTConfig]:
    """A classifier's params without its head, and a config whose head is the (tied) embedding."""
    return {k: v for k, v in params.items() if k != "out_head"}, cfg.replace(tie_embeddings=True)


# ----------------------------------------------------------------------------- Hugging Face GPT-2

# Activations that are GPT-2's tanh approximation of GELU (the model's `gelu`).
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def gpt_config_from_hf(hf_config: Mapping[str, Any]) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 ``config.json`` (as a dict).

    Raises ValueError for settings jaxgpt's model cannot reproduce (another activation or
    LayerNorm epsilon, a non-4x MLP, unscaled or layer-scaled attention, cross-attention).
    """

    def get(key: str, default: Any) -> Any:
        value = hf_config.get(key)
        return default if value is None else value

    model_type = get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"model_type is {model_type!r}, expected 'gpt2'")
    activation = get("activation_function", "gelu_new")
    if activation not in _TANH_GELUS:
        raise ValueError(f"activation_function is {activation!r}; jaxgpt supports {_TANH_GELUS}")
    eps = float(get("layer_norm_epsilon", 1e-5))
    if not np.isclose(eps, 1e-5, rtol=1e-6, atol=0.0):
        raise ValueError(f"layer_norm_epsilon is {eps}; jaxgpt's LayerNorm uses 1e-5")
    n_embd = int(get("n_embd", 768))
    n_inner = get("n_inner", 4 * n_embd)
    if n_inner != 4 * n_embd:
        raise ValueError(f"n_inner is {n_inner}; jaxgpt's feed-forward width is 4 * n_embd = {4 * n_embd}")
    for key, supported in [
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ]:
        if bool(get(key, supported)) != supported:
            raise ValueError(f"{key}={get(key, supported)!r} is not supported (jaxgpt needs {supported})")

    return GPTConfig(
        vocab_size=int(get("vocab_size", 50257)),
        context_length=int(get("n_positions", get("n_ctx", 1024))),
        emb_dim=n_embd,
        n_heads=int(get("n_head", 12)),
        n_layers=int(get("n_layer", 12)),
        drop_rate=float(get("resid_pdrop", 0.1)),
        qkv_bias=True,  # GPT-2's c_attn always has a bias
        tie_embeddings=bool(get("tie_word_embeddings", True)),
    )


def hf_config_from_gpt(cfg: GPTConfig) -> dict[str, Any]:
    """Hugging Face ``config.json`` contents for ``cfg`` (the inverse of :func:`gpt_config_from_hf`)."""
    if not getattr(cfg, "norm_first", True):
        raise ValueError("norm_first=False (Post-LN) has no Hugging Face GPT-2 equivalent, which is Pre-LN")
    eot = 50256  # GPT-2's <|endoftext|>, only meaningful when the vocabulary contains it
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot if cfg.vocab_size > eot else None,
        "eos_token_id": eot if cfg.vocab_size > eot else None,
        "torch_dtype": "float32",
    }


def params_from_hf(state: Mapping[str, Any], cfg: GPTConfig) -> Params:
    """Hugging Face GPT-2 tensors (names with or without ``transformer.``) -> jaxgpt params.

    ``c_attn`` (C, 3C) is split into W_query, W_key and W_value; per-layer tensors are stacked
    on a leading layer axis; ``lm_head.weight`` becomes ``out_head/kernel`` (transposed) when
    ``cfg.tie_embeddings`` is False, and must equal ``wte`` otherwise. Missing or unexpected
    tensors, or a wrong shape, raise ValueError naming the tensor (and both shapes).
    """
    return _import(state, cfg, HF_GPT2)


def params_to_hf(params: Params, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """jaxgpt params -> Hugging Face GPT-2 tensors named as ``save_pretrained`` writes them.

    ``lm_head.weight`` is included only for an untied head. With ``qkv_bias=False`` the
    ``c_attn.bias`` Hugging Face needs is written as zeros. A classifier's head (a bias beside
    its kernel) has no place in ``GPT2LMHeadModel``, nor exactly in ``GPT2ForSequenceClassification``,
    whose head has no bias: ValueError.
    """
    classes = classifier_classes(params)
    if classes is not None:
        raise ValueError(
            f"the params are a {classes}-class classifier: Hugging Face's GPT2LMHeadModel has no place "
            "for its head, and GPT2ForSequenceClassification's head has no bias; write the book's .pth "
            "(--to book), whose GPTModel takes out_head = Linear(emb_dim, num_classes)"
        )
    return _export(params, cfg, HF_GPT2)


def hf_head_is_tied(state: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face state has no ``lm_head.weight`` of its own (or one equal to ``wte``)."""
    tensors, _ = _normalise(state, HF_GPT2)
    head, emb = tensors.get(HF_GPT2.head), tensors.get("wte.weight")
    return head is None or (emb is not None and np.array_equal(head, emb))


_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"


@contextlib.contextmanager
def _new_dirs(path: Path) -> Iterator[None]:
    """Create directory ``path`` and its missing parents; remove those it created if the body fails."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for p in created:  # deepest first; a directory someone else has written into stays
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write; renamed onto ``path`` (with the permissions the
    user's umask gives a new file) when the body succeeds, deleted whenever anything fails.

    Nested uses rename as they close, innermost first, only after every body has succeeded.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_hf_gpt2(path: str | Path) -> tuple[GPTConfig, Params]:
    """Read a local Hugging Face GPT-2 directory (``config.json`` + ``model.safetensors``).

    Needs no torch. The head is untied when the config says so or when the file carries an
    ``lm_head.weight`` that differs from ``wte``; the returned config records which.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no Hugging Face model directory at {path}")
    for file in (_CONFIG_FILE, _WEIGHTS_FILE):
        if not (path / file).is_file():
            raise FileNotFoundError(
                f"{path / file} not found: a GPT-2 directory needs {_CONFIG_FILE} and {_WEIGHTS_FILE}"
            )
    config_file, weights_file = path / _CONFIG_FILE, path / _WEIGHTS_FILE
    try:
        hf_config = json.loads(config_file.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{config_file} is not a readable JSON file: {_one_line(e)}") from e
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_file} holds a JSON {type(hf_config).__name__}, expected an object")
    try:
        cfg = gpt_config_from_hf(hf_config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_file}: {_one_line(e)}") from e
    try:
        state = load_file(weights_file)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{weights_file} is not a readable safetensors file: {_one_line(e)}") from e
    cfg = cfg.replace(tie_embeddings=cfg.tie_embeddings and hf_head_is_tied(state))
    return cfg, params_from_hf(state, cfg)


def save_hf_gpt2(cfg: GPTConfig, params: Params, path: str | Path) -> None:
    """Write ``params`` as a Hugging Face GPT-2 directory that ``GPT2LMHeadModel.from_pretrained`` loads.

    jaxgpt-only settings (compute dtype, remat, scan unroll) are not part of the Hugging Face
    format and are not written.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; a Hugging Face model is a directory")
    config = json.dumps(hf_config_from_gpt(cfg), indent=2) + "\n"
    tensors = {name: value.astype(np.float32) for name, value in params_to_hf(params, cfg).items()}
    with (
        _new_dirs(path),
        _atomic(path / _WEIGHTS_FILE) as weights_tmp,
        _atomic(path / _CONFIG_FILE) as config_tmp,
    ):
        # transformers refuses safetensors files without this format tag.
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        config_tmp.write_text(config)


# ----------------------------------------------------------------------------- the book's PyTorch GPTModel

_BOOK_LINEAR = ("att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.layers.0", "ff.layers.2")


def _book_layout(qkv_bias: bool) -> Layout:
    """The book's ``GPTModel`` (chapter 4): our names are its names, but every ``nn.Linear``
    stores its weight as (out, in), the transpose of a flax kernel, and the query/key/value
    biases exist only when ``qkv_bias`` is set. ``att.mask`` is the causal-mask buffer
    ``register_buffer`` puts in the state dict."""
    block = {
        "norm1.scale": ("norm1", "scale"),
        "norm1.shift": ("norm1", "shift"),
        "att.out_proj.bias": ("att", "out_proj", "bias"),
        "norm2.scale": ("norm2", "scale"),
        "norm2.shift": ("norm2", "shift"),
        "ff.layers.0.bias": ("ff", "layers_0", "bias"),
        "ff.layers.2.bias": ("ff", "layers_2", "bias"),
        "att.out_proj.weight": ("att", "out_proj", "kernel"),
        "ff.layers.0.weight": ("ff", "layers_0", "kernel"),
        "ff.layers.2.weight": ("ff", "layers_2", "kernel"),
    }
    for name in _QKV:
        block[f"att.{name}.weight"] = ("att", name, "kernel")
        if qkv_bias:
            block[f"att.{name}.bias"] = ("att", name, "bias")
    return Layout(
        top={
            "tok_emb.weight": ("tok_emb", "embedding"),
            "pos_emb.weight": ("pos_emb", "embedding"),
            "final_norm.scale": ("final_norm", "scale"),
            "final_norm.shift": ("final_norm", "shift"),
        },
        block=block,
        block_prefix="trf_blocks.{i}.",
        head="out_head.weight",
        transposed=frozenset({f"{linear}.weight" for linear in _BOOK_LINEAR} | {"out_head.weight"}),
        ignored=(".att.mask",),
    )


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array-like -> NumPy float32."""
    if hasattr(value, "detach"):  # torch.Tensor, imported by whoever made it
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _read_book_state(state_dict_or_path: Mapping[str, Any] | str | Path) -> dict[str, np.ndarray]:
    if isinstance(state_dict_or_path, (str, Path)):
        path = Path(state_dict_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no PyTorch state dict file at {path}")
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f'reading {path} needs torch, which is not installed: pip install "jaxgpt[reference]"'
            ) from e
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # random bytes, a pickled model object, a truncated zip: all unreadable
            # torch's first line may be a paragraph about weights_only: keep only a short one
            detail, reason = _one_line(e), type(e).__name__
            if detail != reason and len(detail) < 80:
                reason += f": {detail}"

            raise ValueError(
                f"torch.load cannot read the file ({reason}); expected torch.save(model.state_dict())"
            ) from e

    else:
        state = state_dict_or_path
    expected = "expected a state dict (tensor name -> tensor)"
    if not isinstance(state, Mapping):
        raise ValueError(f"{expected}, got a {type(state).__name__}")
    if "model_state_dict" in state:  # the book's 5.4 checkpoint, which also holds "optimizer_state_dict"
        state = state["model_state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"'model_state_dict' holds a {type(state).__name__}, {expected}")
    prefix = "_orig_mod."  # a torch.compile'd model's state dict
    if state and all(str(k).startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    for key, value in state.items():
        if not (hasattr(value, "detach") or isinstance(value, np.ndarray)):
            raise ValueError(f"entry {key!r} is a {type(value).__name__}, not a tensor: {expected}")
    return {str(k): _to_numpy(v) for k, v in state.items()}


def book_config_from_state(
    state: Mapping[str, np.ndarray], cfg: GPTConfig | None = None, n_heads: int | None = None
) -> GPTConfig:
    """The GPTConfig of a book ``GPTModel`` state dict, read from its tensor shapes.

    vocab_size, emb_dim, context_length, n_layers and qkv_bias follow from the shapes; n_heads
    does not, so it comes from ``cfg``, else ``n_heads``, else the preset with this emb_dim.
    Fields that ``cfg`` gives and the shapes contradict are an error naming both values.
    """
    for name in ("tok_emb.weight", "pos_emb.weight"):
        if name not in state or np.ndim(state[name]) != 2:
            raise ValueError(f"not a book GPTModel state dict: no 2-D {name!r} (keys: {sorted(state)[:8]})")
    V, C = state["tok_emb.weight"].shape
    parts = [k.split(".") for k in state]
    layers = {int(p[1]) for p in parts if len(p) > 2 and p[0] == "trf_blocks" and p[1].isdigit()}
    if not layers:
        raise ValueError("not a book GPTModel state dict: no trf_blocks.{i}.* tensors")
    inferred = {
        "vocab_size": int(V),
        "emb_dim": int(C),
        "context_length": int(state["pos_emb.weight"].shape[0]),
        "n_layers": max(layers) + 1,
        "qkv_bias": "trf_blocks.0.att.W_query.bias" in state,
    }
    if cfg is None:
        from jaxgpt.config import PRESETS

        heads = {n_heads} if n_heads is not None else {p.n_heads for p in PRESETS.values() if p.emb_dim == C}
        if len(heads) != 1:
            raise ValueError(
                f"the number of heads is not in the tensors and no preset has emb_dim={C}: "
                "pass n_heads (--n-heads to the scripts) or cfg"
            )
        heads_ = heads.pop()
        if C % heads_:
            raise ValueError(f"emb_dim {C} is not divisible by n_heads={heads_}")
        return GPTConfig(n_heads=heads_, tie_embeddings=False, **inferred)
    wrong = [
        f"{k}: cfg {getattr(cfg, k)!r}, tensors {v!r}" for k, v in inferred.items() if getattr(cfg, k) != v
    ]
    if wrong:
        raise ValueError("cfg does not match the state dict: " + "; ".join(wrong))
    if not cfg.norm_first:
        raise ValueError("the book's GPTModel is Pre-LN: cfg.norm_first must be True")
    return cfg.replace(tie_embeddings=False)


def load_book_state_dict(
    state_dict_or_path: Mapping[str, Any] | str | Path,
    cfg: GPTConfig | None = None,
    n_heads: int | None = None,
) -> tuple[GPTConfig, Params]:
    """Import the book's PyTorch ``GPTModel`` (``llms_from_scratch.ch04``) -> (GPTConfig, params).

    ``state_dict_or_path``: ``model.state_dict()`` (torch tensors or NumPy arrays), or a file
    written by ``torch.save(model.state_dict(), path)`` or the book's ``{"model_state_dict": ...}``
    checkpoint (torch is needed only to read the file). The config is read from the shapes, with
    n_heads from ``cfg`` or ``n_heads`` or a preset (see :func:`book_config_from_state`); the book
    model's separate ``out_head`` is kept (``tie_embeddings=False``). Every tensor name and shape
    is checked first. The book's chapter 6 classifier (an ``out_head`` with a bias, (K, C) and
    (K,)) comes back with its head as ``out_head/kernel`` (C, K) and ``out_head/bias`` (K,).
    """
    state = _read_book_state(state_dict_or_path)
    head = None
    if "out_head.bias" in state:  # a classifier: set its head aside, import the rest
        weight, bias = state.pop("out_head.weight", None), state.pop("out_head.bias")
        if weight is None or weight.ndim != 2 or bias.shape != weight.shape[:1]:
            got = None if weight is None else weight.shape
            raise ValueError(f"out_head.bias {bias.shape} needs an out_head.weight (K, C); got {got}")
        head = {"kernel": jnp.asarray(weight.T), "bias": jnp.asarray(bias)}  # (C, K), (K,)
        state["out_head.weight"] = state.get("tok_emb.weight")  # a stand-in of the LM head's shape
    cfg = book_config_from_state(state, cfg, n_heads)
    params = _import(state, cfg, _book_layout(cfg.qkv_bias))
    if head is not None:
        params["out_head"] = head
    return cfg, params


def book_state_dict(params: Params, cfg: GPTConfig, include_mask: bool = True) -> dict[str, np.ndarray]:
    """jaxgpt params -> the book ``GPTModel``'s state dict as NumPy arrays (inverse of the import).

    ``model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`` loads it into
    ``GPTModel(cfg_dict)``. A tied model gets an ``out_head.weight`` equal to ``tok_emb.weight``.
    With ``include_mask`` each layer's ``att.mask`` buffer (the causal mask, 1 above the
    diagonal) is written too, so a strict ``load_state_dict`` accepts it. A classifier (see
    :func:`classifier_classes`) gets the book's chapter 6 head: ``out_head.weight`` (K, C) and
    ``out_head.bias`` (K,), which ``GPTModel`` loads after ``model.out_head = nn.Linear(C, K)``.
    """
    if not cfg.norm_first:
        raise ValueError("norm_first=False (Post-LN) has no book GPTModel equivalent, which is Pre-LN")
    layout = _book_layout(cfg.qkv_bias)
    if classifier_classes(params) is not None:
        trunk, trunk_cfg = _lm_part(params, cfg)
        out = _export(trunk, trunk_cfg, layout)
        out["out_head.weight"] = np.ascontiguousarray(np.asarray(params["out_head"]["kernel"]).T)  # (K, C)
        out["out_head.bias"] = np.ascontiguousarray(np.asarray(params["out_head"]["bias"]))  # (K,)
    else:
        out = _export(params, cfg, layout)
    if cfg.tie_embeddings and classifier_classes(params) is None:
        out[layout.head] = np.ascontiguousarray(out["tok_emb.weight"])  # (V, C) is (out, in) already
    if include_mask:
        mask = np.triu(np.ones((cfg.context_length, cfg.context_length), np.float32), k=1)
        for i in range(cfg.n_layers):
            out[layout.block_prefix.format(i=i) + "att.mask"] = mask
    return out


def save_book_state_dict(cfg: GPTConfig, params: Params, path: str | Path) -> None:
    """Write ``params`` as a ``.pth`` file the book's ``GPTModel.load_state_dict(torch.load(path))`` reads.

    Needs torch. The file is written to a temporary name first and renamed, so it is never half written.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; a book .pth is a file")
    state = {name: torch.from_numpy(np.array(value)) for name, value in book_state_dict(params, cfg).items()}
    with _new_dirs(path.parent), _atomic(path) as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------- one loader for every source


def _one_line(e: BaseException) -> str:
    """An exception's message in one line: without TensorStore's array specs, the first line."""
    text = re.sub(r"\s*See full TensorStore details: <bound method.*?\}\)>\.?", "", str(e), flags=re.DOTALL)
    text = re.sub(r"\s*\[tensorstore_spec='.*?'\]", "", text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


BOOK_SUFFIXES = (".pth", ".pt")


@dataclass(frozen=True)
class WeightSource:
    """One kind of model :func:`load` reads: its ``name`` and a description of ``what`` it is (for
    messages), ``matches(path)`` to recognise it without reading it, and ``read(path, n_heads)``."""

    name: str
    what: str
    matches: Callable[[Path], bool]
    read: Callable[[Path, int | None], tuple[GPTConfig, Params]]


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / _CONFIG_FILE).is_file() and (path / _WEIGHTS_FILE).is_file()


def _is_training_checkpoint(path: Path) -> bool:
    """A run directory (it has ``checkpoints/``), its ``checkpoints/`` or one step directory in it."""
    subdir = "checkpoints"  # jaxgpt.checkpoint.CHECKPOINT_SUBDIR, without importing orbax to look
    if not path.is_dir():
        return False
    step_dir = path.name.isdigit() and ((path / "meta").is_dir() or path.parent.name == subdir)
    return (path / subdir).is_dir() or path.name == subdir or step_dir


def _is_book_file(path: Path) -> bool:
    return path.is_file() and path.suffix in BOOK_SUFFIXES


def _read_hf(path: Path, n_heads: int | None) -> tuple[GPTConfig, Params]:
    return load_hf_gpt2(path)


def _read_checkpoint(path: Path, n_heads: int | None) -> tuple[GPTConfig, Params]:
    from jaxgpt.checkpoint import load_checkpoint  # imported here: orbax is slow to import

    with _quiet_failed_restore():
        return load_checkpoint(path)


def _is_restore_noise(unraisable: Any) -> bool:
    """What a failed orbax restore leaves behind: TensorStore's threads finding the event loop
    closed, and orbax's abandoned read coroutines, each with its own copy of the error."""
    error, origin = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    return closed_loop or (origin is not None and "orbax" in origin.co_filename)


@contextlib.contextmanager
def _quiet_failed_restore() -> Iterator[None]:
    """Turn a failed restore into one ValueError without the dozens of tracebacks its leftovers
    print (see :func:`_is_restore_noise`) while it runs and later, when the abandoned coroutines
    are collected, however late. After a failure the filter therefore stays in place; it passes
    every other report on. The ValueError carries the failure's message, not its frames."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_restore_noise(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except Exception as e:
        message = _one_line(e)
    else:
        sys.unraisablehook = previous
        return
    raise ValueError(message)


def _read_book(path: Path, n_heads: int | None) -> tuple[GPTConfig, Params]:
    return load_book_state_dict(path, n_heads=n_heads)


def _is_openai_dir(path: Path) -> bool:
    from jaxgpt.pretrained import is_openai_checkpoint_dir  # imported here: pretrained imports this module

    return is_openai_checkpoint_dir(path)


def _read_openai(path: Path, n_heads: int | None) -> tuple[GPTConfig, Params]:
    from jaxgpt.pretrained import load_openai_checkpoint

    return load_openai_checkpoint(path)


def _is_pretrained_name(path: Path) -> bool:
    """A GPT-2 name (``gpt2``, ``124M``, ...) naming no model on disk (``pretrained.is_local_model``)."""
    from jaxgpt.pretrained import is_local_model, pretrained_repo

    name = os.fspath(path)
    return pretrained_repo(name) is not None and not is_local_model(name)


def _read_pretrained(path: Path, n_heads: int | None) -> tuple[GPTConfig, Params]:
    from jaxgpt.pretrained import from_pretrained

    return from_pretrained(os.fspath(path))


# What jaxgpt.load recognises, tried in this order; another source is one more entry here.
SOURCES: list[WeightSource] = [
    WeightSource(
        "Hugging Face directory",
        "a Hugging Face directory (config.json + model.safetensors)",
        _is_hf_dir,
        _read_hf,
    ),
    WeightSource(
        "training checkpoint", "a training run or step directory", _is_training_checkpoint, _read_checkpoint
    ),
    WeightSource("book .pth file", "the book's .pth state dict", _is_book_file, _read_book),
    WeightSource(
        "TensorFlow checkpoint directory",
        "OpenAI's GPT-2 directory (as the book's gpt_download.py writes it)",
        _is_openai_dir,
        _read_openai,
    ),
    WeightSource(
        "GPT-2 name",
        "a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)",
        _is_pretrained_name,
        _read_pretrained,
    ),
]


def _expected() -> str:
    kinds = [source.what for source in SOURCES]
    return ", ".join(kinds[:-1]) + " or " + kinds[-1]


def check_finite(params: Params, where: str | Path = "params") -> None:
    """Raise ValueError naming the first tensor of ``params`` holding a NaN or an infinity."""
    for path, leaf in flatten_dict(params).items():
        finite = jnp.isfinite(leaf)
        if not bool(jnp.all(finite)):
            kind = "NaN" if bool(jnp.any(jnp.isnan(leaf))) else "infinite"
            bad = int(jnp.size(finite) - jnp.sum(finite))
            raise ValueError(
                f"{where}: tensor {'/'.join(path)} holds {bad} {kind} values; refusing a model with "
                "non-finite weights (was it saved after training diverged?)"
            )


def load(path: str | Path, n_heads: int | None = None) -> tuple[GPTConfig, Params]:
    """(GPTConfig, params) from any model path jaxgpt knows, recognised by what the path is.

    ``path``: a training run directory (its latest checkpoint) or one of its step directories,
    a Hugging Face GPT-2 directory (config.json + model.safetensors), the book's ``.pth`` state
    dict (needs torch), the directory the book's ``gpt_download.py`` writes (``gpt2/124M``), or a
    GPT-2 name (``gpt2`` ... ``gpt2-xl``, see :func:`jaxgpt.from_pretrained`). A ``.pth`` does not
    record its heads: ``n_heads`` gives them, else the preset of its width; for the other sources,
    which record it, ``n_heads`` must agree.

    Raises FileNotFoundError when nothing is at ``path``, ValueError (one line naming the path and
    what was expected) for anything unreadable, incompatible or holding NaN or infinite weights,
    and ImportError when reading a ``.pth`` without torch.
    """
    if n_heads is not None and (isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0):
        raise ValueError(f"n_heads must be a positive integer, got {n_heads!r}")
    path = Path(path)
    source = next((s for s in SOURCES if s.matches(path)), None)
    if source is None:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: expected {_expected()}")
        hint = ""
        if path.is_dir() and (path / _CONFIG_FILE).is_file():
            hint = f" (it has {_CONFIG_FILE} but neither {_WEIGHTS_FILE} nor checkpoints/)"
        elif path.is_file():
            hint = f" (a file not named *{' or *'.join(BOOK_SUFFIXES)})"
        kinds = [s.what for s in SOURCES]
        raise ValueError(f"{path} is neither {', '.join(kinds[:-1])} nor {kinds[-1]}{hint}")
    try:
        cfg, params = source.read(path, n_heads)
    except (ImportError, MemoryError, FileNotFoundError):  # a missing file names itself
        raise
    except Exception as e:  # every reader's errors, whatever their type, become one line naming the path
        raise ValueError(f"cannot load {path} as a {source.name}: {_one_line(e)}") from e
    if n_heads is not None and cfg.n_heads != n_heads:
        raise ValueError(f"{path} records n_heads={cfg.n_heads}, but n_heads={n_heads} was given")
    check_finite(params, path)
    return cfg, params
