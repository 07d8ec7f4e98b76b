"""Random Mesa inputs in the layer's ranges, shared by the operator tests."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import expit, log_expit

from mesanet_jax.ops import MesaState, mesa_exact


def random_inputs(batch=2, length=37, heads=3, key_dim=8, value_dim=5, *, seed=0, dtype=jnp.float32,
                  with_state=False, decay_bias=3.0):
  """q, k unit-norm; v ~ N(0, 1); γ = σ(N(decay_bias, 1)); β = σ(N(0, 1)); λ = 0.25 + softplus(N(0, 1)).

  The optional initial state is a genuine Mesa state: decayed sums over 6 earlier random tokens. Drawn with numpy in
  f64 and cast to `dtype`: eager jax.random and jnp ops would compile once per shape (~0.5–1.5 s a new shape).
  Returns (q, k, v, g, beta, lam, state).
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(normal(batch, length, heads, key_dim))
  k = unit(normal(batch, length, heads, key_dim))
  v = normal(batch, length, heads, value_dim)
  g = log_expit(normal(batch, length, heads) + decay_bias)
  beta = expit(normal(batch, length, heads))
  lam = 0.25 + np.logaddexp(0.0, normal(heads, key_dim))  # softplus
  cast = lambda *arrays: tuple(jnp.asarray(x.astype(dtype)) for x in arrays)
  state = None
  if with_state:
    past_k, past_v = unit(normal(batch, heads, 6, key_dim)), normal(batch, heads, 6, value_dim)
    h_kk = np.einsum("bhrk,bhrl->bhkl", past_k, past_k)
    # Symmetric to the last bit, as every Mesa state is (the cast keeps it): a product's rounding can differ between
    # (k, l) and (l, k), and CG's implicit gradient assumes A = Aᵀ while the dense solve's differentiates A as given.
    h_kk = (h_kk + np.swapaxes(h_kk, -1, -2)) / 2
    state = MesaState(*cast(h_kk, np.einsum("bhrk,bhrv->bhkv", past_k, past_v)))
  return (*cast(q, k, v, g, beta, lam), state)


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
  """Normal weights shaped as o, h_kk and h_kv (arrays or jax.ShapeDtypeStructs), drawn in f32 with numpy whatever
  their dtype, so that f32 and f64 runs weigh their outputs identically."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(x.shape, np.float32).astype(x.dtype))
               for x in (o, state.h_kk, state.h_kv))


def output_weights(op, args):
  """loss_weights shaped as the outputs of op(*args), from their shapes alone (nothing is compiled or run)."""
  return loss_weights(*jax.eval_shape(op, *args)[:2])


def value_and_gradients(op, args):
  """(op(*args), the gradients w.r.t. the seven inputs of weighted_sum_loss with the weights `output_weights` draws
  for args' shapes: the same for every op given the same inputs). One program per op and shapes: the forward compiles
  once, where a forward program and a gradient program would each compile it. Pass the same object for the same op
  (e.g. a cached partial) to reuse the program."""
  return _value_and_gradients(op, args, output_weights(mesa_exact, args))


@functools.partial(jax.jit, static_argnums=0)
def _value_and_gradients(op, args, weights):
  return op(*args), jax.grad(weighted_sum_loss(op, weights), argnums=range(7))(*args)
