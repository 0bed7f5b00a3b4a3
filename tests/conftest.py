import jax

# Accidental broadcasting between arrays of different rank is an error in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")
