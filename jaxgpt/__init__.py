"""jaxgpt: the GPT-2 of *Build a Large Language Model (From Scratch)* in pure functional JAX/Flax.

Everything a user needs is re-exported here; params are plain pytrees and every step is a pure
function of its inputs and an explicit ``jax.random`` key.

``jaxgpt.generate`` and ``jaxgpt.generate_ragged`` are the generation functions of the module
``jaxgpt.generation``; the speed devices behind the model are in ``jaxgpt.ops``.
"""

from jaxgpt.chat import ChatModel, check_messages, conversation_text, stream_text, stream_tokens
from jaxgpt.chat_server import make_server
from jaxgpt.checkpoint import load_checkpoint
from jaxgpt.classify import (
    ClassificationLoader,
    add_classification_head,
    calc_accuracy_loader,
    classifier_logits,
    classify_review,
    create_classifier_state,
    make_dataset,
    partition_params,
    read_labeled_texts,
    train_classifier_simple,
)
from jaxgpt.config import PRESETS, GPTConfig, backend_defaults, get_config
from jaxgpt.data import DataLoader, create_dataloader, default_corpus, sliding_windows, train_val_split
from jaxgpt.dpo import (
    PreferenceLoader,
    collate_preference,
    dpo_loss,
    dpo_train_step,
    encode_preference_data,
    evaluate_dpo,
    read_preference_data,
    sequence_logprobs,
    train_dpo,
)
from jaxgpt.evaluate import perplexity, score_lambada, score_multiple_choice
from jaxgpt.generation import (
    apply_temperature,
    generate,
    generate_ragged,
    sample_next_token,
    top_k_mask,
    top_p_mask,
)
from jaxgpt.instruct import (
    InstructionDataError,
    InstructionDataset,
    InstructionLoader,
    JudgeError,
    custom_collate_fn,
    extract_response,
    format_example,
    format_input,
    format_prompt,
    generate_model_scores,
    generate_responses,
    load_instruction_data,
    query_model,
    response_loss,
    split_data,
)
from jaxgpt.lora import init_lora, lora_param_count, merge_lora
from jaxgpt.loss import calc_loss_batch, calc_loss_loader, cross_entropy
from jaxgpt.model import GPTModel, count_params, init_cache, init_params
from jaxgpt.pretrained import from_pretrained
from jaxgpt.sharding import make_mesh, shard_train_step, state_shardings
from jaxgpt.shards import open_shards, prepare_shards
from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from jaxgpt.train import (
    TrainConfig,
    TrainState,
    create_train_state,
    evaluate_model,
    generate_and_print_sample,
    make_optimizer,
    train_step,
)
from jaxgpt.weights import (
    book_state_dict,
    classifier_classes,
    load,
    load_book_state_dict,
    load_hf_gpt2,
    not_a_language_model,
    params_from_hf,
    params_to_hf,
    save_book_state_dict,
    save_hf_gpt2,
)

__all__ = [
    "PRESETS",
    "ChatModel",
    "ClassificationLoader",
    "DataLoader",
    "GPTConfig",
    "GPTModel",
    "InstructionDataError",
    "InstructionDataset",
    "InstructionLoader",
    "JudgeError",
    "PreferenceLoader",
    "TrainConfig",
    "TrainState",
    "add_classification_head",
    "apply_temperature",
    "backend_defaults",
    "book_state_dict",
    "calc_accuracy_loader",
    "calc_loss_batch",
    "calc_loss_loader",
    "check_messages",
    "classifier_classes",
    "classifier_logits",
    "classify_review",
    "conversation_text",
    "collate_preference",
    "count_params",
    "create_classifier_state",
    "create_dataloader",
    "create_train_state",
    "cross_entropy",
    "custom_collate_fn",
    "default_corpus",
    "dpo_loss",
    "dpo_train_step",
    "encode_preference_data",
    "evaluate_dpo",
    "evaluate_model",
    "extract_response",
    "format_example",
    "format_input",
    "format_prompt",
    "from_pretrained",
    "generate",
    "generate_and_print_sample",
    "generate_model_scores",
    "generate_ragged",
    "generate_responses",
    "get_config",
    "get_tokenizer",
    "init_cache",
    "init_lora",
    "init_params",
    "load",
    "load_book_state_dict",
    "load_checkpoint",
    "load_hf_gpt2",
    "load_instruction_data",
    "lora_param_count",
    "make_dataset",
    "make_mesh",
    "make_optimizer",
    "make_server",
    "merge_lora",
    "not_a_language_model",
    "open_shards",
    "params_from_hf",
    "params_to_hf",
    "partition_params",
    "perplexity",
    "prepare_shards",
    "query_model",
    "read_labeled_texts",
    "response_loss",
    "read_preference_data",
    "sample_next_token",
    "save_book_state_dict",
    "save_hf_gpt2",
    "score_lambada",
    "score_multiple_choice",
    "sequence_logprobs",
    "shard_train_step",
    "sliding_windows",
    "split_data",
    "state_shardings",
    "stream_text",
    "stream_tokens",
    "text_to_token_ids",
    "token_ids_to_text",
    "top_k_mask",
    "top_p_mask",
    "train_classifier_simple",
    "train_dpo",
    "train_step",
    "train_val_split",
]
