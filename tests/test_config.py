import pytest

from jaxgpt.config import PRESETS, GPTConfig, backend_defaults, get_config


def test_defaults_are_the_books_124m_config():
    cfg = GPTConfig()
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (
        50257,
        1024,
        768,
        12,
        12,
    )
    assert cfg.drop_rate == 0.1 and cfg.qkv_bias is False and cfg.head_dim == 64


@pytest.mark.parametrize(
    "name, emb_dim, n_heads, n_layers",
    [
        ("gpt2-small", 768, 12, 12),
        ("gpt2-medium", 1024, 16, 24),
        ("gpt2-large", 1280, 20, 36),
        ("gpt2-xl", 1600, 25, 48),
    ],
)
def test_presets_have_the_gpt2_sizes(name, emb_dim, n_heads, n_layers):
    cfg = PRESETS[name]
    assert (cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.context_length) == (emb_dim, n_heads, n_layers, 1024)


def test_config_is_frozen_and_replace_validates():
    cfg = get_config("gpt2-small", context_length=256)
    assert cfg.context_length == 256
    with pytest.raises(AttributeError):
        cfg.emb_dim = 10  # type: ignore[misc]
    with pytest.raises(ValueError, match="emb_dim"):
        cfg.replace(emb_dim=100, n_heads=12)


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("context_length", -1),
        ("emb_dim", 0),
        ("n_heads", 0),
        ("n_layers", 1.5),
        ("drop_rate", 1.0),
        ("drop_rate", -0.1),
        ("dtype", "float16"),
        ("activation_dtype", "float16"),
        ("activation_dtype", "bfloat16"),  # bf16 activations need bf16 matmuls (dtype stays float32 here)
        ("remat", "sometimes"),
        ("scan_unroll", 0),
        ("vocab_pad_multiple", 0),
        ("vocab_pad_multiple", True),
        ("init", "xavier"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{field: value})


def test_invalid_init_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"GPTConfig.init must be one of \('gpt2', 'book'\), got 'pytorch'"):
        GPTConfig(init="pytorch")


def test_book_preset_is_the_books_chapter_5_model():
    # the book's GPT_CONFIG_124M as ch05's gpt_train.py writes it (context 256), trained with a
    # separate out_head from PyTorch's default initialisation
    book = {
        "vocab_size": 50257,
        "context_length": 256,
        "emb_dim": 768,
        "n_heads": 12,
        "n_layers": 12,
        "drop_rate": 0.1,
        "qkv_bias": False,
    }
    cfg = get_config("book-124m")
    assert {k: getattr(cfg, k) for k in book} == book
    assert cfg.tie_embeddings is False and cfg.init == "book"
    assert GPTConfig().init == "gpt2" and all(PRESETS[f"gpt2-{s}"].init == "gpt2" for s in ("small", "xl"))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt2-small"):
        get_config("gpt5")


def test_dict_round_trip_and_unknown_keys():
    cfg = get_config("quickstart")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="colour"):
        GPTConfig.from_dict({**cfg.to_dict(), "colour": "red"})


@pytest.mark.parametrize(
    "vocab, multiple, padded", [(50257, 1, 50257), (50257, 64, 50304), (512, 64, 512), (97, 24, 120)]
)
def test_padded_vocab_size_rounds_up_to_the_multiple(vocab, multiple, padded):
    assert GPTConfig(vocab_size=vocab, vocab_pad_multiple=multiple).padded_vocab_size == padded


def test_backend_defaults_keep_the_book_on_cpu_and_make_valid_configs_elsewhere():
    assert backend_defaults("cpu", 12) == {}  # float32, scanned: the book's settings
    for name, preset in PRESETS.items():
        for backend in ("gpu", "tpu"):
            cfg = get_config(name, **backend_defaults(backend, preset.n_layers))
            assert (cfg.dtype, cfg.activation_dtype) == ("bfloat16", "bfloat16")
        assert get_config(name, **backend_defaults("gpu", preset.n_layers)).scan_unroll == preset.n_layers
