"""What several tests share about the book's PyTorch code: a tiny config and one training step."""

from __future__ import annotations

# The book's GPT_CONFIG dict, shrunk for tests (its keys are the book's, and GPTConfig's).
BOOK_CFG = {
    "vocab_size": 97,
    "context_length": 16,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
}


def book_classifier_step(ch06, model, optimizer, x, y) -> float:
    """One optimizer step of the book's chapter 6 loop on NumPy batches (x, y); returns the loss."""
    import torch

    model.train()
    optimizer.zero_grad()
    loss = ch06.calc_loss_batch(torch.from_numpy(x), torch.from_numpy(y), model, "cpu")
    loss.backward()
    optimizer.step()
    return loss.item()
