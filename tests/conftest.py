import jax

# Accidental broadcasting between arrays of different rank is an error in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")

# GPUs run float32 matmuls as TF32 by default (10-bit mantissas); the float32 tests compare against
# float32 and float64 references, so on a GPU they ask for full float32 products.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")
