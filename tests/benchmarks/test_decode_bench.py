"""The kernel count per decode step read from compiled HLO (`benchmarks/hlo_sources.py`, decode_bench's report): the
decode scan's loop body is found even when its carry is a tuple wide enough for XLA to annotate (`/*index=5*/`), as a
model's cache always is."""
import re

import jax
import jax.numpy as jnp

from benchmarks.hlo_sources import launches_per_step


def test_kernels_per_step_of_a_scan_with_a_wide_carry_and_a_nested_loop():
  def body(carry, _):
    carry = tuple(jnp.sin(x) * 2 for x in carry)
    inner = jax.lax.while_loop(lambda c: c[0] < carry[0][0] * 100, lambda c: (c[0] + 1.0, c[1] * 0.5), (0.0, 1.0))
    return carry, inner[1]

  carry = tuple(jnp.arange(3.0) + i for i in range(6))
  text = jax.jit(lambda c: jax.lax.scan(body, c, None, length=50)).lower(carry).compile().as_text()
  assert "/*index=5*/" in text
  kernels = re.fullmatch(r"(\d+) kernels \+ 1 nested while loops", launches_per_step(text))
  assert kernels and int(kernels.group(1)) >= 1
