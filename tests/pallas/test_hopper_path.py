"""The GPU default path of `mesa_chunked(impl="pallas")` as it runs on an H100 / H200, with every Hopper kernel forced
(interpreted on CPU): bf16 q, k, v reaching the kernels as bf16, the forward's q and o token-major, no x written
without a gradient, the chunk states saved; against the XLA path on the same values in f32."""
import jax
import jax.numpy as jnp
import pytest

from mesanet_jax.ops import mesa_chunked
from pallas_kernels.mesa_cg import operator as pallas_operator
from pallas_kernels.mesa_cg import states as pallas_states
from tests.ops.mesa_inputs import max_abs, random_inputs, scale

# One fp16 pass ("default", 11 bits: ~5e-4 of each product's scale) through a few CG steps, then o rounded to bf16
# (2^-9 relative): pallas_check.py's bound for "default" (measured there on an H100: ≤ 9.2e-4; here, interpreted,
# ≤ 3.3e-3, dq's, with o's bf16 rounding in its cotangent).
TOLERANCE = 2e-2


@pytest.mark.slow  # every Hopper kernel interpreted, forward and backward (~40 s on 2 cores)
def test_the_gpu_default_path_matches_the_xla_path(monkeypatch):
  forced = {name: [] for name in ("solve", "states", "gradients")}
  force = lambda name: lambda *_: forced[name].append(True) or True
  monkeypatch.setattr(pallas_operator, "use_hopper_solve", force("solve"))
  monkeypatch.setattr(pallas_operator, "use_hopper_gradients", force("gradients"))
  monkeypatch.setattr(pallas_states, "use_hopper_states", force("states"))
  q, k, v, *rest = random_inputs(1, 128, 2, 64, 64, seed=13, with_state=True)
  inputs = (*(x.astype(jnp.bfloat16) for x in (q, k, v)), *rest)
  wide = (*(x.astype(jnp.float32) for x in inputs[:3]), *rest)
  settings = dict(chunk_size=64, cg_steps=30, cg_tol=1e-4)
  gpu_default = lambda *a: mesa_chunked(*a, **settings, impl="pallas", matmul_precision="default", save_states=True)
  reference = lambda *a: mesa_chunked(*a, **settings, impl="xla", matmul_precision="highest")

  o, final = jax.jit(gpu_default)(*inputs)  # no gradient: the Hopper solve writes o alone, token-major
  want_o, want_final = jax.jit(reference)(*wide)
  assert o.dtype == jnp.bfloat16 and o.shape == want_o.shape
  assert max_abs(o, want_o) <= TOLERANCE * scale(want_o)
  assert max_abs(final, want_final) <= TOLERANCE * scale(want_final)
  assert forced["solve"] and forced["states"]

  loss = lambda op: lambda *a: sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(op(*a)))
  grads = jax.jit(jax.grad(loss(gpu_default), argnums=range(7)))(*inputs)
  want = jax.jit(jax.grad(loss(reference), argnums=range(7)))(*wide)
  for name, got, expected in zip(("q", "k", "v", "g", "beta", "lam", "state"), grads, want):
    for leaf, leaf_expected in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      assert max_abs(leaf, leaf_expected) <= TOLERANCE * scale(leaf_expected), name
  assert forced["gradients"]
