"""jaxgpt.xla: the compile options are real XLA options, and change speed, not results."""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.xla import CPU_MATMULS, ONEDNN_DOTS, compiler_options, cpu_vendor, training_matmuls


def test_cpu_gets_llvm_level_1_other_backends_keep_xla_defaults():
    assert compiler_options("cpu") == {"xla_backend_optimization_level": 1}
    assert compiler_options("gpu", training=True) is None
    assert compiler_options("gpu") is None
    assert compiler_options("tpu") is None
    assert compiler_options("cpu") is not compiler_options("cpu")  # a fresh dict: callers may edit it


def test_options_compile_and_give_the_same_numbers():
    def f(x):  # a fused elementwise loop and a reduction: what LLVM's level changes
        return jnp.sum(jax.nn.gelu(x, approximate=True) * jnp.exp(-x * x), axis=-1)

    x = jax.random.normal(jax.random.key(0), (64, 1000), jnp.float32)
    plain = jax.jit(f)(x)
    tuned = jax.jit(f, compiler_options=compiler_options("cpu"))(x)
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(plain), rtol=1e-6, atol=1e-6)


def test_compilation_cache_directory_and_opt_out(tmp_path, monkeypatch):
    from jaxgpt.xla import NO_CACHE, enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv(NO_CACHE, "1")
        assert enable_compilation_cache(tmp_path / "off") is None and not (tmp_path / "off").exists()
        monkeypatch.delenv(NO_CACHE)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        assert enable_compilation_cache() == tmp_path / "xdg" / "jaxgpt" / "xla"
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own variable wins
        assert enable_compilation_cache() == tmp_path / "jax"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
        (tmp_path / "file").write_text("")
        assert enable_compilation_cache(tmp_path / "file" / "sub") is None  # cannot be created: stays off
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
    import os
    import subprocess
    import sys

    program = (
        "import jax, jax.numpy as jnp, jax.monitoring\n"
        "from jaxgpt.xla import enable_compilation_cache\n"
        "events = []\n"
        "jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))\n"
        f"enable_compilation_cache({str(tmp_path / 'cache')!r})\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # cache even a tiny program\n"
        "f = jax.jit(lambda x: jnp.tanh(x) @ x.T)\n"
        "print(float(f(jnp.ones((64, 64))).sum()), '/jax/compilation_cache/cache_hits' in events)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAXGPT_NO_COMPILE_CACHE"}
    runs = [
        subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env) for _ in "ab"
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    (value_a, hit_a), (value_b, hit_b) = (r.stdout.split() for r in runs)
    assert (hit_a, hit_b) == ("False", "True")  # compiled by the first process, loaded by the second
    assert value_a == value_b


def test_cpu_vendor_reads_cpuinfo():
    intel = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
    amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
    assert cpu_vendor(intel) == "GenuineIntel"
    assert cpu_vendor(amd) == "AuthenticAMD"
    assert cpu_vendor("processor : 0\nCPU implementer : 0x41\n") is None  # an Arm cpuinfo has no vendor_id


def test_training_matmul_library_choice_and_override(monkeypatch):
    monkeypatch.setenv(CPU_MATMULS, "onednn")
    assert training_matmuls() == "onednn"
    assert compiler_options("cpu", training=True) == {"xla_backend_optimization_level": 1, **ONEDNN_DOTS}
    assert compiler_options("cpu") == {"xla_backend_optimization_level": 1}  # decoding keeps YNNPACK
    monkeypatch.setenv(CPU_MATMULS, "ynnpack")
    assert compiler_options("cpu", training=True) == {"xla_backend_optimization_level": 1}
    monkeypatch.setenv(CPU_MATMULS, "mkl")
    with pytest.raises(ValueError, match="JAXGPT_CPU_MATMULS='mkl': expected auto, onednn or ynnpack"):
        training_matmuls()
    monkeypatch.delenv(CPU_MATMULS)
    intel = platform.machine() == "x86_64" and cpu_vendor() == "GenuineIntel"
    assert training_matmuls() == ("onednn" if intel else "ynnpack")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="XLA's oneDNN dots exist on x86-64 only")
def test_train_step_on_onednn_matmuls_matches_ynnpack(monkeypatch):
    """The same step with its matmuls on either library: the same loss and params to float32 rounding."""
    from jaxgpt.config import GPTConfig
    from jaxgpt.train import TrainConfig, create_train_state, jit_train_step

    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    windows = jax.random.randint(jax.random.key(1), (3, 4, 17), 0, 97)  # 3 steps of B=4 windows of T+1
    results = {}
    for library in ("ynnpack", "onednn"):
        monkeypatch.setenv(CPU_MATMULS, library)
        jit_train_step.cache_clear()  # compile anew under each choice
        state, tx = create_train_state(cfg, TrainConfig(), jax.random.key(0), total_steps=3)
        step = jit_train_step(cfg, tx)
        losses = []
        for w in windows:
            state, metrics = step(state, (w[:, :-1], w[:, 1:]))
            losses.append(float(metrics["loss"]))
        results[library] = (losses, state.params)
    jit_train_step.cache_clear()
    np.testing.assert_allclose(results["onednn"][0], results["ynnpack"][0], rtol=1e-5)
    onednn, ynnpack = jax.tree.leaves(results["onednn"][1]), jax.tree.leaves(results["ynnpack"][1])
    for a, b in zip(onednn, ynnpack, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
