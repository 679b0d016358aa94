import jax

# Tests run in float64 (DESIGN: float64 is the user's choice; the tests choose it).
jax.config.update("jax_enable_x64", True)
