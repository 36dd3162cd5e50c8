"""pytest session settings shared by every test file.

The tests compile hundreds of small functions, so compile time dominates the suite on a 2-core CPU.
XLA's heavy optimisation passes are switched off for tests: they speed up large programs but not the
semantics under test, and turning them off roughly halves each compile.
"""

import jax

jax.config.update("jax_disable_most_optimizations", True)
