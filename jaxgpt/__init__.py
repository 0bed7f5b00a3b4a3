"""jaxgpt: the GPT-2 of *Build a Large Language Model (From Scratch)* in pure functional JAX/Flax.

Everything a user needs is re-exported here; params are plain pytrees and every step is a pure
function of its inputs and an explicit ``jax.random`` key.
"""

from jaxgpt.config import PRESETS, GPTConfig, get_config
from jaxgpt.data import create_dataloader, default_corpus, sliding_windows
from jaxgpt.generate import generate
from jaxgpt.loss import calc_loss_batch, calc_loss_loader, cross_entropy
from jaxgpt.model import GPTModel, count_params, init_cache, init_params
from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from jaxgpt.weights import load_hf_gpt2, params_from_hf, params_to_hf, save_hf_gpt2

__all__ = [
    "PRESETS",
    "GPTConfig",
    "GPTModel",
    "calc_loss_batch",
    "calc_loss_loader",
    "count_params",
    "create_dataloader",
    "cross_entropy",
    "default_corpus",
    "generate",
    "get_config",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load_hf_gpt2",
    "params_from_hf",
    "params_to_hf",
    "save_hf_gpt2",
    "sliding_windows",
    "text_to_token_ids",
    "token_ids_to_text",
]
