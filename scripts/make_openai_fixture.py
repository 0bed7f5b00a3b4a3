"""Write the test fixture: a tiny GPT-2 saved by real TensorFlow in OpenAI's release layout.

OpenAI published GPT-2 as a TensorFlow 1 checkpoint (the directory the book's ``gpt_download.py``
writes); jaxgpt reads that format without TensorFlow, so its tests need a checkpoint that
TensorFlow itself wrote. This script is the only place TensorFlow is used:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu numpy safetensors
    /tmp/tfvenv/bin/python scripts/make_openai_fixture.py tests/fixtures

(``pip install -e .[fixtures]`` names the same packages.) From one set of seeded random weights
(2 layers, 2 heads, width 8, 64 positions, GPT-2's full 50,257-token vocabulary, so any text
tokenizes into it; 1.7 MB, nearly all of it the token embedding) it writes ``openai_tiny/``:
``checkpoint``, ``hparams.json``, ``model.ckpt.index``, ``model.ckpt.data-00000-of-00001`` and
``model.ckpt.meta``, saved by ``tf.compat.v1.train.Saver`` from variables named as OpenAI's
(``model/wte``, ``model/h0/attn/c_attn/w`` of shape (1, C, 3C), ...).

``--hf`` also writes ``openai_tiny_hf/``: the same weights as a Hugging Face GPT-2 directory
(``config.json``, ``model.safetensors``). That part needs only NumPy and safetensors, so the tests
build it themselves (:func:`write_hf` of :func:`make_weights`) instead of committing a second copy.

The weights are drawn wider than GPT-2's initialisation so the model's predictions are far from
uniform and scoring tests can tell endings apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 8, "n_head": 2, "n_layer": 2}
SEED = 1234


def make_weights(hp: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Random GPT-2 weights under OpenAI's names and TensorFlow shapes (conv1d weights (1, in, out))."""
    rng = np.random.default_rng(seed)
    C, V = hp["n_embd"], hp["n_vocab"]

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"model/wte": normal(V, C, std=0.5), "model/wpe": normal(hp["n_ctx"], C, std=0.1)}
    for i in range(hp["n_layer"]):
        h = f"model/h{i}/"
        for ln in ("ln_1", "ln_2"):
            weights[h + ln + "/g"] = (1.0 + normal(C, std=0.1)).astype(np.float32)
            weights[h + ln + "/b"] = normal(C, std=0.1)
        for name, n_in, n_out in [
            ("attn/c_attn", C, 3 * C),
            ("attn/c_proj", C, C),
            ("mlp/c_fc", C, 4 * C),
            ("mlp/c_proj", 4 * C, C),
        ]:
            weights[h + name + "/w"] = normal(1, n_in, n_out, std=0.3)
            weights[h + name + "/b"] = normal(n_out, std=0.1)
    weights["model/ln_f/g"] = (1.0 + normal(C, std=0.1)).astype(np.float32)
    weights["model/ln_f/b"] = normal(C, std=0.1)
    return weights


def write_openai(weights: dict[str, np.ndarray], hp: dict[str, int], out: Path) -> None:
    """Save ``weights`` as OpenAI did: TF1 variables under the ``model`` scope and a Saver."""
    import tensorflow as tf

    tf1 = tf.compat.v1
    out.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        # Zeros-initialised variables, loaded afterwards: the graph in model.ckpt.meta stays small.
        variables = {
            name: tf1.get_variable(name, value.shape, tf.float32, tf1.zeros_initializer())
            for name, value in weights.items()
        }
        saver = tf1.train.Saver(list(variables.values()), save_relative_paths=True)  # as OpenAI's file
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for name, variable in variables.items():
                variable.load(weights[name], sess)
            saver.save(sess, str(out / "model.ckpt"))
    (out / "hparams.json").write_text(json.dumps(hp, indent=2) + "\n")


def write_hf(weights: dict[str, np.ndarray], hp: dict[str, int], out: Path) -> None:
    """The same weights as a Hugging Face GPT-2 directory (names without ``transformer.``)."""
    from safetensors.numpy import save_file

    renames = {"ln_1/g": "ln_1.weight", "ln_1/b": "ln_1.bias", "ln_2/g": "ln_2.weight", "ln_2/b": "ln_2.bias"}
    state = {}
    for name, value in weights.items():
        short = name.removeprefix("model/")
        if short in ("wte", "wpe"):
            state[short + ".weight"] = value
        elif short.startswith("ln_f/"):
            state["ln_f." + {"g": "weight", "b": "bias"}[short[-1]]] = value
        else:
            layer, rest = short.split("/", 1)
            rest = renames.get(rest) or rest.replace("/w", ".weight").replace("/b", ".bias").replace("/", ".")
            state[f"h.{layer[1:]}.{rest}"] = value[0] if value.ndim == 3 else value
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": hp["n_vocab"],
        "n_positions": hp["n_ctx"],
        "n_ctx": hp["n_ctx"],
        "n_embd": hp["n_embd"],
        "n_head": hp["n_head"],
        "n_layer": hp["n_layer"],
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "tie_word_embeddings": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write openai_tiny/ into (tests/fixtures)")
    parser.add_argument("--hf", action="store_true", help="also write the Hugging Face twin openai_tiny_hf/")
    args = parser.parse_args(argv)
    weights = make_weights(HPARAMS, SEED)
    write_openai(weights, HPARAMS, args.out / "openai_tiny")
    print(f"wrote {args.out / 'openai_tiny'}")
    if args.hf:
        write_hf(weights, HPARAMS, args.out / "openai_tiny_hf")
        print(f"wrote {args.out / 'openai_tiny_hf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
