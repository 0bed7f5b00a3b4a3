"""jaxgpt.xla: the compile options are real XLA options, and change speed, not results."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.xla import compiler_options


def test_cpu_gets_llvm_level_1_other_backends_keep_xla_defaults():
    assert compiler_options("cpu") == {"xla_backend_optimization_level": 1}
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
