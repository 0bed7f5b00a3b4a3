"""Write the Hugging Face reference that the parity tests compare jaxgpt against.

The llm.c way: PyTorch runs a tiny, seeded, random GPT-2 once and writes its inputs,
logits, loss, the gradient of the loss for every weight and greedy-generated ids to one
file; ``tests/test_parity.py`` then loads the same weights through ``load_hf_gpt2`` and
compares tensor by tensor.

Needs the ``reference`` extra (CPU PyTorch + transformers). Usage::

    python scripts/make_reference.py            # rewrites tests/fixtures/
    python scripts/make_reference.py --out DIR

Output under the chosen directory:

- ``hf_tiny/``: the model as ``save_pretrained`` writes it (config.json, model.safetensors).
- ``hf_tiny_reference.npz``: ``input_ids`` and ``targets`` (B, T); ``logits`` (B, T, V);
  ``loss`` (scalar, the book's ``calc_loss_batch``); ``grad/<hf name>`` for every parameter;
  ``greedy_prompt`` / ``greedy_ids`` (generated with ``model.generate``, prompt + new tokens
  fit the context) and ``greedy_crop_prompt`` / ``greedy_crop_ids`` (longer than the context,
  so every step crops to the last ``n_positions`` tokens like the book's
  ``generate_text_simple``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MODEL_DIR = "hf_tiny"
REFERENCE_FILE = "hf_tiny_reference.npz"

# Small enough for kilobyte fixtures, big enough to have several heads and layers.
HF_CONFIG = dict(
    vocab_size=512,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.1,
    embd_pdrop=0.1,
    attn_pdrop=0.1,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=True,
    bos_token_id=None,  # no end-of-text token: greedy generation never stops early
    eos_token_id=None,
)
SEED = 1234
BATCH, SEQ_LEN = 2, 8
GREEDY_PROMPT_LEN, GREEDY_NEW = 4, 12  # 16 <= n_positions: no cropping
CROP_PROMPT_LEN, CROP_NEW = 24, 16  # 40 > n_positions: the context is cropped
MIN_MARGIN = 1e-3  # smallest accepted gap between the best and second-best logit
# Weight scales: large enough for clear argmax gaps in greedy decoding, small enough to keep
# the loss below 8, where float32 still resolves the 1e-6 tolerance of the parity test.
EMB_STD, MATRIX_STD, OFFSET_STD = 0.3, 0.2, 0.1


def _random_weights(names_and_shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, np.ndarray]:
    """Draw every weight from NumPy's seeded generator, in sorted name order.

    Drawing them here instead of relying on transformers' own initialisation keeps the
    fixture stable across transformers versions. LayerNorm scales and all biases are moved
    away from 1 and 0 so that a swapped or dropped one cannot go unnoticed.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(names_and_shapes):
        noise = rng.standard_normal(shape).astype(np.float32)
        if name.endswith((".wte.weight", ".wpe.weight")):
            value = EMB_STD * noise
        elif ".ln_" in name and name.endswith(".weight"):  # LayerNorm scales: ln_1, ln_2, ln_f
            value = 1.0 + OFFSET_STD * noise
        elif name.endswith(".bias"):  # LayerNorm shifts and Conv1D biases
            value = OFFSET_STD * noise
        else:  # attention and MLP matrices
            value = MATRIX_STD * noise
        weights[name] = value.astype(np.float32)
    return weights


def _greedy(model, ids, max_new_tokens: int, context_length: int):
    """Greedy decoding as in the book's generate_text_simple; also returns the smallest top-2 gap."""
    import torch

    margin = float("inf")
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(ids[:, -context_length:]).logits[:, -1, :]  # (B, V)
        top2 = torch.topk(logits, 2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids, margin


def build_reference(out_dir: str | Path = FIXTURES, seed: int = SEED) -> dict[str, np.ndarray]:
    """Build the seeded HF model, save it and the reference arrays under ``out_dir``; return the arrays."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    config = GPT2Config(**HF_CONFIG, attn_implementation="eager")  # plain softmax(QK^T)V, as in the book
    model = GPT2LMHeadModel(config).float()
    params = dict(model.named_parameters())  # the tied lm_head is listed once, as wte
    weights = _random_weights([(n, tuple(p.shape)) for n, p in params.items()], seed)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(weights[name]))
    model.eval()  # dropout off: the reference is the deterministic forward pass

    rng = np.random.default_rng(seed + 1)
    V, P = config.vocab_size, config.n_positions
    tokens = rng.integers(0, V, size=(BATCH, SEQ_LEN + 1))
    input_ids = torch.from_numpy(tokens[:, :-1].copy())
    targets = torch.from_numpy(tokens[:, 1:].copy())

    model.zero_grad()
    logits = model(input_ids).logits  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # the book's calc_loss_batch
    loss.backward()

    prompt = torch.from_numpy(rng.integers(0, V, size=(BATCH, GREEDY_PROMPT_LEN)))
    with torch.no_grad():
        greedy = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=GREEDY_NEW,
            min_new_tokens=GREEDY_NEW,
            pad_token_id=0,
        )
    looped, margin = _greedy(model, prompt, GREEDY_NEW, P)
    assert torch.equal(greedy, looped), "HF generate and the argmax loop disagree"

    crop_prompt = torch.from_numpy(rng.integers(0, V, size=(BATCH, CROP_PROMPT_LEN)))
    crop_ids, crop_margin = _greedy(model, crop_prompt, CROP_NEW, P)
    # The cropped case is only a test of cropping if a different crop changes the tokens.
    other_crop, _ = _greedy(model, crop_prompt, CROP_NEW, P - 1)
    assert not torch.equal(crop_ids, other_crop), "the crop case does not depend on the crop"
    # A near tie could flip under float32 rounding; refuse to write a fragile fixture.
    assert min(margin, crop_margin) > MIN_MARGIN, f"greedy top-2 gap too small: {min(margin, crop_margin)}"

    ref = {
        "input_ids": input_ids.numpy().astype(np.int32),
        "targets": targets.numpy().astype(np.int32),
        "logits": logits.detach().numpy().astype(np.float32),
        "loss": np.asarray(loss.item(), dtype=np.float32),
        "greedy_prompt": prompt.numpy().astype(np.int32),
        "greedy_ids": greedy.numpy().astype(np.int32),
        "greedy_crop_prompt": crop_prompt.numpy().astype(np.int32),
        "greedy_crop_ids": crop_ids.numpy().astype(np.int32),
    }
    for name, p in params.items():
        ref[f"grad/{name}"] = p.grad.detach().numpy().astype(np.float32)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / MODEL_DIR)
    np.savez_compressed(out_dir / REFERENCE_FILE, **ref)
    return ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help="output directory (tests/fixtures)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    ref = build_reference(args.out, args.seed)
    print(f"wrote {args.out / MODEL_DIR} and {args.out / REFERENCE_FILE}: {len(ref)} arrays")


if __name__ == "__main__":
    main()
