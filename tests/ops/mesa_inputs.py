"""Random Mesa inputs in the layer's ranges, shared by the operator tests."""
import jax
import jax.numpy as jnp
import numpy as np

from mesanet_jax.ops import MesaState


def random_inputs(batch=2, length=37, heads=3, key_dim=8, value_dim=5, *, seed=0, dtype=jnp.float32,
                  with_state=False, decay_bias=3.0):
  """q, k unit-norm; v ~ N(0, 1); γ = σ(N(decay_bias, 1)); β = σ(N(0, 1)); λ = 0.25 + softplus(N(0, 1)).

  The optional initial state is a genuine Mesa state: decayed sums over 6 earlier random tokens.
  Returns (q, k, v, g, beta, lam, state).
  """
  keys = jax.random.split(jax.random.key(seed), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(keys[0], (batch, length, heads, key_dim), dtype))
  k = unit(jax.random.normal(keys[1], (batch, length, heads, key_dim), dtype))
  v = jax.random.normal(keys[2], (batch, length, heads, value_dim), dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (batch, length, heads), dtype) + decay_bias)
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, length, heads), dtype))
  lam = 0.25 + jax.nn.softplus(jax.random.normal(keys[5], (heads, key_dim), dtype))
  state = None
  if with_state:
    past_k = unit(jax.random.normal(keys[6], (batch, heads, 6, key_dim), dtype))
    past_v = jax.random.normal(keys[7], (batch, heads, 6, value_dim), dtype)
    h_kk = jnp.einsum("bhrk,bhrl->bhkl", past_k, past_k)
    # Symmetric to the last bit, as every Mesa state is: the einsum's rounding can differ between (k, l) and (l, k)
    # (by CPU kernel), and CG's implicit gradient assumes A = Aᵀ while the dense solve's differentiates A as given.
    h_kk = (h_kk + jnp.matrix_transpose(h_kk)) / 2
    state = MesaState(h_kk, jnp.einsum("bhrk,bhrv->bhkv", past_k, past_v))
  return q, k, v, g, beta, lam, state


def as_f64(tree):
  """Casts every array of a pytree to f64 (call inside `jax.enable_x64(True)`)."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def max_abs(a, b) -> float:
  """Largest elementwise |a − b| over two matching pytrees, computed in f64 numpy."""
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in leaves)


def scale(tree) -> float:
  """Largest |entry| over a pytree: the scale that absolute errors are compared with."""
  return max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))


def weighted_sum_loss(op, weights):
  """A scalar loss Σ w·o + Σ w·h_kk + Σ w·h_kv that sends cotangents into o and both final states."""
  def loss(*args):
    o, state = op(*args)[:2]
    return sum(jnp.sum(w * x) for w, x in zip(weights, (o, state.h_kk, state.h_kv)))
  return loss


def loss_weights(o, state, seed=123):
  keys = jax.random.split(jax.random.key(seed), 3)
  # Drawn in f32 whatever the dtype of o, so that f32 and f64 runs weigh their outputs identically.
  return tuple(jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype) for key, x in zip(keys, (o, state.h_kk, state.h_kv)))
