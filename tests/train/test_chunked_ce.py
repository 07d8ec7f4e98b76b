"""The fused chunked read-out + cross-entropy equals the unfused path (whole logits, optax's cross-entropy, logsumexp
for the z-loss): values, argmax and gradients w.r.t. the hidden states and the read-out weights, with and without
the soft-cap, T not divisible by the chunk, f64 (tight) and bf16 activations; and the train loss through a model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mesanet_jax.models.config import preset
from mesanet_jax.models.lm import LanguageModel
from mesanet_jax.train.chunked_ce import chunked_cross_entropy
from mesanet_jax.train.loss import loss_sums


def _unfused(x, w, targets, cap):
  logits = jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.promote_types(jnp.float32, x.dtype))
  if cap is not None:
    logits = jnp.tanh(logits / cap) * cap
  return (optax.softmax_cross_entropy_with_integer_labels(logits, targets), jax.nn.logsumexp(logits, -1),
          jnp.argmax(logits, -1))


def _objective(ce_fn, mask, z_loss):
  """The train loss's form: Σ mask·ce + z·Σ mask·lse², as a function of (x, w)."""
  def objective(x, w, targets):
    ce, lse, _ = ce_fn(x, w, targets)
    return jnp.sum(ce * mask) + z_loss * jnp.sum(lse ** 2 * mask)
  return objective


def _values_and_grads(ce_fn, z_loss):
  """ce_fn's (ce, lse, argmax) and the gradients of `_objective` w.r.t. (x, w), one jitted program per function."""
  def values_and_grads(x, w, targets, mask):
    return ce_fn(x, w, targets), jax.grad(_objective(ce_fn, mask, z_loss), argnums=(0, 1))(x, w, targets)
  return jax.jit(values_and_grads)


@functools.partial(jax.jit, static_argnames=("dtype", "batch", "length", "dim", "vocab"))  # one program, not eager ops
def _inputs(dtype, batch=2, length=37, dim=16, vocab=50, seed=0):
  kx, kw, kt, km = jax.random.split(jax.random.key(seed), 4)
  x = (3.0 * jax.random.normal(kx, (batch, length, dim))).astype(dtype)  # logits of a few units: the cap bends
  w = jax.random.normal(kw, (vocab, dim)).astype(dtype)
  targets = jax.random.randint(kt, (batch, length), 0, vocab)
  mask = (jax.random.uniform(km, (batch, length)) > 0.2).astype(jnp.float32)
  return x, w, targets, mask


@pytest.mark.slow
@pytest.mark.parametrize("cap", [None, 30.0, 5.0])
def test_values_and_gradients_equal_the_unfused_path_in_f64(x64, cap):
  x, w, targets, mask = _inputs(jnp.float64)
  fused = lambda x, w, t: chunked_cross_entropy(x, w, t, cap, 8)  # 37 = 4 chunks of 8 + 5: padding is exercised
  (values, grads), (want_values, want_grads) = [_values_and_grads(f, 1e-2)(x, w, targets, mask)
                                                for f in (fused, lambda x, w, t: _unfused(x, w, t, cap))]
  for got, want in zip(values, want_values):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)  # same f64 math, another summation order
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_bf16_activations_match_the_unfused_path():
  """bf16 x and w, f32 logits in both; the fused backward rounds dlogits to bf16 before its products as the unfused
  einsum's transpose does with its bf16 operands, so gradients agree to a few bf16 ulps (2^-8 ≈ 4e-3 relative)."""
  x, w, targets, mask = _inputs(jnp.bfloat16, length=64)
  fused = lambda x, w, t: chunked_cross_entropy(x, w, t, 30.0, 16)
  unfused = lambda x, w, t: _unfused(x, w, t, 30.0)
  (got, grads), (want, want_grads) = [_values_and_grads(f, 1e-4)(x, w, targets, mask) for f in (fused, unfused)]
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)  # f32 logits from the same bf16 products
  np.testing.assert_array_equal(got[2], want[2])
  for got, want in zip(grads, want_grads):
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2 * scale)


@pytest.mark.slow  # a whole model's gradients, twice
@pytest.mark.parametrize("tie", [True, False])
def test_the_train_loss_and_its_gradients_are_unchanged(tie):
  # The read-out and loss are the same code behind every mixer: attention blocks compile in a fraction of Mesa's.
  config = preset("tiny", "transformer", tie_embeddings=tie)
  graphdef, params = nnx.split(LanguageModel(config, rngs=nnx.Rngs(0)), nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, config.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((2, 20)).at[0, :3].set(0.0)}
  loss = lambda chunk: lambda p: loss_sums(graphdef, p, nnx.State({}), batch, "lm", 1e-3, chunk)
  results = [jax.jit(jax.value_and_grad(loss(chunk), has_aux=True))(params) for chunk in (0, 8)]  # one program each
  (loss0, aux0), grads0 = results[0]
  (loss1, aux1), grads1 = results[1]
  # f32 throughout; only the logsumexp's and the weight gradient's summation order differ (~1e-7 relative per op),
  # carried back through 4 blocks (with Mesa's 30-step CG: up to 1.1e-6 of the largest gradient entry).
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  assert aux1["correct"] == aux0["correct"]
  for got, want in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))) + 1e-9)
