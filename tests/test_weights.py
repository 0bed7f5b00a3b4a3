"""The Hugging Face GPT-2 layout: key mapping, error messages, files on disk, transformers itself."""

from __future__ import annotations

import json
import os
import re
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel, init_params
from jaxgpt.weights import (
    gpt_config_from_hf,
    hf_config_from_gpt,
    load,
    load_book_state_dict,
    load_hf_gpt2,
    params_from_hf,
    params_to_hf,
    save_book_state_dict,
    save_hf_gpt2,
)

C, V, P, L = 16, 64, 12, 2
TINY = GPTConfig(vocab_size=V, context_length=P, emb_dim=C, n_heads=2, n_layers=L, qkv_bias=True)


def hf_state(cfg: GPTConfig = TINY, seed: int = 0, untied: bool = False) -> dict:
    """A random Hugging Face GPT-2 state dict written out by hand from HF's naming scheme."""
    rng = np.random.default_rng(seed)
    c, n = cfg.emb_dim, cfg.n_layers
    shapes = {"wte.weight": (cfg.vocab_size, c), "wpe.weight": (cfg.context_length, c)}
    for i in range(n):
        shapes.update(
            {
                f"h.{i}.ln_1.weight": (c,),
                f"h.{i}.ln_1.bias": (c,),
                f"h.{i}.attn.c_attn.weight": (c, 3 * c),
                f"h.{i}.attn.c_attn.bias": (3 * c,),
                f"h.{i}.attn.c_proj.weight": (c, c),
                f"h.{i}.attn.c_proj.bias": (c,),
                f"h.{i}.ln_2.weight": (c,),
                f"h.{i}.ln_2.bias": (c,),
                f"h.{i}.mlp.c_fc.weight": (c, 4 * c),
                f"h.{i}.mlp.c_fc.bias": (4 * c,),
                f"h.{i}.mlp.c_proj.weight": (4 * c, c),
                f"h.{i}.mlp.c_proj.bias": (c,),
            }
        )
    shapes.update({"ln_f.weight": (c,), "ln_f.bias": (c,)})
    state = {"transformer." + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    if untied:
        state["lm_head.weight"] = rng.standard_normal((cfg.vocab_size, c)).astype(np.float32)
    return state


def random_params(cfg: GPTConfig, seed: int = 0) -> dict:
    """Params with jaxgpt's tree, every leaf random (so that no two leaves can be confused)."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def assert_trees_equal(a, b) -> None:
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg="/".join(path))


# ------------------------------------------------------------------------------------ key mapping


def test_hf_tensors_land_where_the_book_names_them():
    state = hf_state()
    params = params_from_hf(state, TINY)
    blocks = params["trf_blocks"]
    c_attn = state["transformer.h.1.attn.c_attn.weight"]  # (C, 3C) = [q | k | v]
    np.testing.assert_array_equal(blocks["att"]["W_query"]["kernel"][1], c_attn[:, :C])
    np.testing.assert_array_equal(blocks["att"]["W_key"]["kernel"][1], c_attn[:, C : 2 * C])
    np.testing.assert_array_equal(blocks["att"]["W_value"]["kernel"][1], c_attn[:, 2 * C :])
    c_attn_bias = state["transformer.h.0.attn.c_attn.bias"]
    np.testing.assert_array_equal(blocks["att"]["W_value"]["bias"][0], c_attn_bias[2 * C :])
    c_proj = state["transformer.h.0.mlp.c_proj.weight"]
    np.testing.assert_array_equal(blocks["ff"]["layers_2"]["kernel"][0], c_proj)
    np.testing.assert_array_equal(blocks["norm2"]["shift"][1], state["transformer.h.1.ln_2.bias"])
    np.testing.assert_array_equal(params["final_norm"]["scale"], state["transformer.ln_f.weight"])
    np.testing.assert_array_equal(params["pos_emb"]["embedding"], state["transformer.wpe.weight"])
    assert "out_head" not in params


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_params_from_hf_has_the_model_tree(tie, qkv_bias):
    cfg = TINY.replace(tie_embeddings=tie, qkv_bias=qkv_bias)
    state = hf_state(cfg, untied=not tie)
    if not qkv_bias:
        for i in range(L):
            state[f"transformer.h.{i}.attn.c_attn.bias"][:] = 0.0
    params = params_from_hf(state, cfg)
    expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
    for path, leaf in flatten_dict(params).items():
        assert leaf.shape == flatten_dict(expected)[path].shape, "/".join(path)
        assert leaf.dtype == jnp.float32, "/".join(path)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_to_params_to_hf_is_exact(tie):
    cfg = TINY.replace(tie_embeddings=tie)
    state = hf_state(cfg, untied=not tie)
    back = params_to_hf(params_from_hf(state, cfg), cfg)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_params_to_hf_to_params_is_exact(tie, qkv_bias):
    cfg = TINY.replace(tie_embeddings=tie, qkv_bias=qkv_bias)
    params = random_params(cfg)
    state = params_to_hf(params, cfg)
    assert ("lm_head.weight" in state) == (not tie)
    if not tie:
        np.testing.assert_array_equal(state["lm_head.weight"], np.asarray(params["out_head"]["kernel"]).T)
    if not qkv_bias:  # Hugging Face always has a c_attn bias: it is written as zeros
        assert not np.any(state["transformer.h.0.attn.c_attn.bias"])
    assert_trees_equal(params_from_hf(state, cfg), params)


@pytest.mark.parametrize("tie", [True, False])
def test_a_padded_vocabulary_is_zeros_in_and_gone_out(tie):
    cfg = TINY.replace(tie_embeddings=tie)
    padded_cfg = cfg.replace(vocab_pad_multiple=48)  # 64 -> 96 rows
    state = hf_state(cfg, untied=not tie)
    params = params_from_hf(state, padded_cfg)
    emb = np.asarray(params["tok_emb"]["embedding"])
    assert emb.shape == (96, C)
    np.testing.assert_array_equal(emb[:V], state["transformer.wte.weight"])
    assert not emb[V:].any()
    if not tie:
        head = np.asarray(params["out_head"]["kernel"])
        assert head.shape == (C, 96) and not head[:, V:].any()
    params = jax.tree_util.tree_map(lambda a: a + 1.0, params)  # padding no longer zero: still dropped
    back = params_to_hf(params, padded_cfg)
    assert back["transformer.wte.weight"].shape == (V, C)
    np.testing.assert_array_equal(back["transformer.wte.weight"], state["transformer.wte.weight"] + 1.0)
    with pytest.raises(
        ValueError, match=r"tok_emb/embedding has 96 vocabulary entries.*pads vocab_size=64 to 128"
    ):
        params_to_hf(params, cfg.replace(vocab_pad_multiple=128))


def test_names_without_prefix_and_hf_buffers_are_accepted():
    state = {k.removeprefix("transformer."): v for k, v in hf_state().items()}
    for i in range(L):
        state[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, P, P), np.float32))  # causal-mask buffers
        state[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    assert_trees_equal(params_from_hf(state, TINY), params_from_hf(hf_state(), TINY))


def test_a_tied_file_may_carry_a_copy_of_wte_as_lm_head():
    state = hf_state()
    state["lm_head.weight"] = state["transformer.wte.weight"].copy()
    assert_trees_equal(params_from_hf(state, TINY), params_from_hf(hf_state(), TINY))


# ------------------------------------------------------------------------------------ errors


def test_missing_tensor_is_named_with_its_shape():
    state = hf_state()
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=re.escape(f"transformer.h.1.mlp.c_fc.bias ({4 * C},)")):
        params_from_hf(state, TINY)


def test_wrong_shape_names_the_tensor_and_both_shapes():
    state = hf_state()
    state["transformer.h.0.attn.c_proj.weight"] = np.zeros((C, C - 1), np.float32)
    message = f"'transformer.h.0.attn.c_proj.weight' has shape ({C}, {C - 1}), expected ({C}, {C})"
    with pytest.raises(ValueError, match=re.escape(message)):
        params_from_hf(state, TINY)


def test_config_mismatch_reports_the_wrong_shape():
    message = f"'transformer.wpe.weight' has shape ({P}, {C}), expected ({P + 4}, {C})"
    with pytest.raises(ValueError, match=re.escape(message)):
        params_from_hf(hf_state(), TINY.replace(context_length=P + 4))


def test_unexpected_tensor_is_named():
    state = hf_state()
    state["transformer.h.2.ln_1.weight"] = np.ones((C,), np.float32)  # a third layer in a 2-layer config
    with pytest.raises(ValueError, match=re.escape("transformer.h.2.ln_1.weight")):
        params_from_hf(state, TINY)


def test_untied_head_with_tied_config_is_an_error():
    with pytest.raises(ValueError, match="lm_head.weight.*tie_embeddings=False"):
        params_from_hf(hf_state(untied=True), TINY)


def test_missing_head_with_untied_config_is_an_error():
    with pytest.raises(ValueError, match=re.escape(f"lm_head.weight ({V}, {C})")):
        params_from_hf(hf_state(), TINY.replace(tie_embeddings=False))


def test_nonzero_qkv_bias_needs_qkv_bias_config():
    with pytest.raises(ValueError, match="c_attn.bias.*qkv_bias=True"):
        params_from_hf(hf_state(), TINY.replace(qkv_bias=False))


# ------------------------------------------------------------------------------------ config.json


def test_config_from_hf_reads_gpt2_fields():
    hf = {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_ctx": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_inner": None,
        "resid_pdrop": 0.0,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
    }
    cfg = gpt_config_from_hf(hf)
    sizes = (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers)
    assert sizes == (50257, 1024, 768, 12, 12)
    assert cfg.drop_rate == 0.0 and cfg.qkv_bias and cfg.tie_embeddings


@pytest.mark.parametrize(
    "change, field",
    [
        ({"activation_function": "relu"}, "activation_function"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"n_inner": 100}, "n_inner"),
        ({"model_type": "llama"}, "model_type"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_config_from_hf_rejects_what_the_model_cannot_do(change, field):
    hf = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2, **change}
    with pytest.raises(ValueError, match=field):
        gpt_config_from_hf(hf)


@pytest.mark.parametrize("tie", [True, False])
def test_config_round_trips_through_hf_config(tie):
    cfg = TINY.replace(tie_embeddings=tie, drop_rate=0.25)
    assert gpt_config_from_hf(hf_config_from_gpt(cfg)) == cfg


def test_post_ln_model_cannot_be_written_as_hf_gpt2(tmp_path):
    with pytest.raises(ValueError, match="norm_first"):
        save_hf_gpt2(TINY.replace(norm_first=False), random_params(TINY), tmp_path / "m")


# ------------------------------------------------------------------------------------ files


def test_load_from_missing_directory_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Hugging Face model directory"):
        load_hf_gpt2(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_gpt(TINY)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_gpt2(tmp_path)


def _write_hf_dir(path, state: dict, tie_word_embeddings: bool = True) -> None:
    path.mkdir()
    hf = {**hf_config_from_gpt(TINY), "tie_word_embeddings": tie_word_embeddings}
    (path / "config.json").write_text(json.dumps(hf))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_load_detects_a_separate_lm_head(tmp_path):
    state = hf_state(untied=True)
    _write_hf_dir(tmp_path / "m", state)  # config says tied, the file says otherwise
    cfg, params = load_hf_gpt2(tmp_path / "m")
    assert not cfg.tie_embeddings
    np.testing.assert_array_equal(params["out_head"]["kernel"], state["lm_head.weight"].T)


def test_load_keeps_a_head_equal_to_wte_tied(tmp_path):
    state = hf_state()
    state["lm_head.weight"] = state["transformer.wte.weight"].copy()
    _write_hf_dir(tmp_path / "m", state)
    cfg, params = load_hf_gpt2(tmp_path / "m")
    assert cfg.tie_embeddings and "out_head" not in params


@pytest.mark.parametrize("tie", [True, False])
def test_save_then_load_round_trips(tmp_path, tie):
    cfg = TINY.replace(tie_embeddings=tie, drop_rate=0.0)
    params = random_params(cfg)
    save_hf_gpt2(cfg, params, tmp_path / "m")
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not tie)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is tie
    loaded_cfg, loaded = load_hf_gpt2(tmp_path / "m")
    assert loaded_cfg == cfg
    assert_trees_equal(loaded, params)


@pytest.mark.parametrize(
    "tie, qkv_bias", [(True, True), (False, True), (True, False)], ids=["tied", "untied", "no_qkv_bias"]
)
def test_transformers_loads_saved_model_with_same_logits(tmp_path, tie, qkv_bias):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = TINY.replace(tie_embeddings=tie, qkv_bias=qkv_bias)
    params = jax.tree_util.tree_map(lambda x: 0.3 * x, random_params(cfg, seed=3))
    save_hf_gpt2(cfg, params, tmp_path / "m")

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    assert hf_model.config.tie_word_embeddings is tie
    ids = np.random.default_rng(0).integers(0, V, size=(2, P), dtype=np.int32)
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    with jax.default_matmul_precision("float32"):
        logits = np.asarray(GPTModel(cfg).apply({"params": params}, jnp.asarray(ids), deterministic=True))
    diff = float(np.abs(logits - expected).max())
    assert diff <= 1e-5, f"logits: max |diff| {diff:.3g} between jaxgpt and transformers"


# ------------------------------------------------------------------------------------ jaxgpt.load


def _saved_run(path, cfg: GPTConfig, params) -> None:
    """A run directory as scripts/train.py leaves it, holding ``params`` as step 3."""
    from jaxgpt.checkpoint import CheckpointManager

    CheckpointManager(path).save(3, params, {"step": np.int32(3)}, {"model_config": cfg.to_dict()})


def test_load_reads_a_run_and_its_step_directory_as_load_checkpoint_does(tmp_path):
    from jaxgpt.checkpoint import load_checkpoint

    params = random_params(TINY)
    _saved_run(tmp_path / "run", TINY, params)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "3"):
        cfg, got = load(path)
        assert cfg == TINY
        assert_trees_equal(got, params)
        assert_trees_equal(got, load_checkpoint(path)[1])


def test_load_reads_a_hugging_face_directory_as_load_hf_gpt2_does(tmp_path):
    state = hf_state(untied=True)
    _write_hf_dir(tmp_path / "m", state)
    cfg, got = load(tmp_path / "m")
    want_cfg, want = load_hf_gpt2(tmp_path / "m")
    assert cfg == want_cfg and not cfg.tie_embeddings
    assert_trees_equal(got, want)
    np.testing.assert_array_equal(got["tok_emb"]["embedding"], state["transformer.wte.weight"])


@pytest.mark.parametrize("n_heads", [None, 4])
def test_load_reads_a_book_pth_with_heads_given_or_from_the_preset(tmp_path, n_heads):
    pytest.importorskip("torch")
    # emb_dim 128 is the quickstart preset's width (4 heads), so heads can come from the preset
    cfg = GPTConfig(vocab_size=V, context_length=P, emb_dim=128, n_heads=4, n_layers=1, tie_embeddings=False)
    params = random_params(cfg)
    save_book_state_dict(cfg, params, tmp_path / "model.pth")
    got_cfg, got = load(tmp_path / "model.pth", n_heads=n_heads)
    assert got_cfg == cfg.replace(drop_rate=got_cfg.drop_rate)
    assert_trees_equal(got, params)
    assert_trees_equal(got, load_book_state_dict(tmp_path / "model.pth", n_heads=4)[1])


def test_load_takes_n_heads_only_where_the_source_lacks_it(tmp_path):
    _write_hf_dir(tmp_path / "m", hf_state())
    with pytest.raises(ValueError, match=r"n_heads=2.*n_heads=4"):
        load(tmp_path / "m", n_heads=4)
    with pytest.raises(ValueError, match="n_heads must be a positive integer"):
        load(tmp_path / "m", n_heads=0)


def test_load_names_the_path_and_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist: expected a Hugging Face"):
        load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"is neither a Hugging Face directory .* \.pth .* nor a GPT-2 name"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has config.json but neither model.safetensors nor checkpoints/"):
        load(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is neither .*not named \*\.pth"):
        load(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", r"config\.json is not a readable JSON file"),
        (b"[1, 2]", r"config\.json holds a JSON list, expected an object"),
        (b'{"model_type": "bert"}', r"config\.json: model_type is 'bert'"),
    ],
)
def test_a_broken_hugging_face_config_is_one_line_naming_the_file(tmp_path, content, message):
    _write_hf_dir(tmp_path / "m", hf_state())
    (tmp_path / "m" / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load(tmp_path / "m")
    assert str(tmp_path / "m") in str(info.value) and "\n" not in str(info.value)


def test_damaged_safetensors_is_one_line_naming_the_file(tmp_path):
    _write_hf_dir(tmp_path / "m", hf_state())
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file") as info:
        load(tmp_path / "m")
    assert "\n" not in str(info.value)


def test_a_damaged_checkpoint_is_one_line_not_a_tensorstore_spec(tmp_path):
    _saved_run(tmp_path / "run", TINY, random_params(TINY))
    chunks = list((tmp_path / "run" / "checkpoints" / "3" / "params").rglob("d/*"))
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"damaged")
    with pytest.raises(ValueError, match=r"cannot load .*run as a training checkpoint: .*step 3") as info:
        load(tmp_path / "run")
    assert "\n" not in str(info.value) and "TensorStore" not in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_load_refuses_non_finite_weights_and_names_the_tensor(tmp_path, bad):
    params = random_params(TINY)
    params["trf_blocks"]["ff"]["layers_2"]["bias"] = (
        params["trf_blocks"]["ff"]["layers_2"]["bias"].at[1, 3].set(bad)
    )
    kind = "NaN" if np.isnan(bad) else "infinite"
    save_hf_gpt2(TINY, params, tmp_path / "hf")
    with pytest.raises(ValueError, match=rf"hf: tensor trf_blocks/ff/layers_2/bias holds 1 {kind} value"):
        load(tmp_path / "hf")
    _saved_run(tmp_path / "run", TINY, params)
    # (the checkpoint reader may refuse them itself, without naming the tensor)
    with pytest.raises(ValueError, match=rf"run.*(holds 1 {kind} value|non-finite)"):
        load(tmp_path / "run")


def _unreadable_pth(tmp_path, kind: str):
    torch = pytest.importorskip("torch")
    path = tmp_path / f"{kind}.pth"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "lists":
        torch.save({"tok_emb.weight": [[1.0, 2.0]], "pos_emb.weight": [[0.0]]}, path)
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "checkpoint_of_lists":
        torch.save({"model_state_dict": [1, 2]}, path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("random", r"torch\.load cannot read the file"),
        ("empty", r"torch\.load cannot read the file"),
        ("lists", r"entry 'tok_emb\.weight' is a list, not a tensor"),
        ("list", r"expected a state dict \(tensor name -> tensor\), got a list"),
        ("checkpoint_of_lists", r"'model_state_dict' holds a list"),
    ],
)
def test_an_unreadable_pth_is_one_line_naming_the_file(tmp_path, kind, message):
    path = _unreadable_pth(tmp_path, kind)
    with pytest.raises(ValueError, match=message) as info:
        load(path, n_heads=2)
    assert str(info.value).startswith(f"cannot load {path} as a book .pth file: ")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ writing files


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_umask_permissions_and_no_temporary_stays(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_hf_gpt2(TINY, random_params(TINY), tmp_path / "hf")
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "hf" / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.numpy

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_hf_gpt2(TINY, random_params(TINY), tmp_path / "new" / "hf")
    assert list(tmp_path.iterdir()) == []  # neither the directories it made nor a temporary file

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("kept")
    with pytest.raises(OSError, match="No space"):
        save_hf_gpt2(TINY, random_params(TINY), tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["config.json"]
    assert (tmp_path / "old" / "config.json").read_text() == "kept"


def test_saving_over_the_wrong_kind_of_path_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; a Hugging Face model is a directory"):
        save_hf_gpt2(TINY, random_params(TINY), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
