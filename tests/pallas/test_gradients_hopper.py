"""The Hopper token-gradients kernel (Pallas Mosaic GPU), interpreted on CPU: against the Triton-path kernel (f32,
"highest") it replaces, on state gradients from the operator's own reverse scan, and inside
`mesa_chunked`'s backward against the XLA path; lowered for CUDA in test_lowering.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy.special import expit

from mesanet_jax.ops import MesaState, mesa_chunked
from mesanet_jax.ops.operator import BoundaryStates, operator_class
from pallas_kernels.mesa_cg import operator as pallas_operator
from pallas_kernels.mesa_cg.gradients import chunk_gradients
from pallas_kernels.mesa_cg.gradients_hopper import hopper_chunk_gradients, unsupported_reason, use_hopper_gradients
from pallas_kernels.mesa_cg.params import lowering_for
from tests.ops.mesa_inputs import max_abs, random_inputs, scale

HIGHEST, DEFAULT = lax.Precision.HIGHEST, lax.Precision.DEFAULT
# Products of fp16 parts of scaled operands: 3 passes keep ~22 bits (2.4e-7 of the operands' scale), 1 pass 11 bits
# (4.9e-4); each output sums 2-3 such products (measured on CPU: 3e-7 – 8e-7 and 4e-4 – 6e-4 of max |ref|).
TOLERANCE = {HIGHEST: 3e-6, DEFAULT: 2e-3}


def problem(chunk, key_dim, value_dim, chunks, seed=0, state_scale=1.0, row_scale=1.0):
  """The kernels' arguments (B=1, H=2, N=chunks, f32): k, v, x, y, do, cumulative log-decay, β and the state
  gradients at every boundary from the XLA operator's reverse scan of a random final gradient."""
  rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile once per shape
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  rows = lambda width: f32(row_scale * rng.standard_normal((1, 2, chunks, chunk, width)))
  k, v, x, y, do = rows(key_dim), rows(value_dim), rows(key_dim), rows(key_dim), rows(value_dim)
  log_decay = f32(np.cumsum(-np.logaddexp(0.0, rng.standard_normal((1, 2, chunks, chunk)) - 2.0), axis=-1))
  beta = f32(expit(rng.standard_normal((1, 2, chunks, chunk))))
  zero = MesaState(jnp.zeros((1, 2, key_dim, key_dim)), jnp.zeros((1, 2, key_dim, value_dim)))
  final = MesaState(*(f32(state_scale * rng.standard_normal(shape.shape)) for shape in zero))
  op = operator_class("xla").build(k, v, log_decay, beta, jnp.ones((2, key_dim)), zero, HIGHEST)
  return (k, v, x, y, do, log_decay, beta, *op.state_gradients(x, y, do, final))


@pytest.mark.slow
@pytest.mark.parametrize("chunk, key_dim, value_dim, chunks, precision", [
    (64, 64, 64, 3, HIGHEST),
    (64, 64, 128, 2, HIGHEST),  # Dk ≠ Dv
    (64, 128, 128, 2, DEFAULT),  # fla's head size; 3 passes do not fit sm_90's shared memory here
])
def test_matches_the_triton_kernel(chunk, key_dim, value_dim, chunks, precision):
  args = problem(chunk, key_dim, value_dim, chunks)
  hopper = hopper_chunk_gradients(*args, precision=precision)
  triton = chunk_gradients(*args, precision=HIGHEST)
  for name, got, want in zip(("dk", "dv", "dbeta"), hopper, triton):
    assert got.shape == want.shape, name
    assert max_abs(got, want) <= TOLERANCE[precision] * scale(want), name


@pytest.mark.slow
def test_handed_on_comes_with_the_gradients():
  """Given the states, the kernel also sums ⟨D, S⟩ at every chunk's end boundary (f32, as `BoundaryStates.
  handed_on`), and its other results stay bit for bit those without."""
  args = problem(64, 64, 128, 3, seed=6)
  k, v, _, _, _, log_decay, beta, *d_bounds = args
  rng = np.random.default_rng(6)
  initial = MesaState(*(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((1, 2, 64, 64),
                                                                                             (1, 2, 64, 128))))
  states = operator_class("xla").build(k, v, log_decay, beta, jnp.ones((2, 64)), initial, HIGHEST).states
  *gradients, handed_on = hopper_chunk_gradients(*args, precision=DEFAULT, states=states)
  for got, want in zip(gradients, hopper_chunk_gradients(*args, precision=DEFAULT)):
    np.testing.assert_array_equal(got, want)
  want = states.handed_on(BoundaryStates(*d_bounds))
  assert handed_on.shape == want.shape == (1, 2, 3)
  assert max_abs(handed_on, want) <= 1e-6 * scale(want)  # f32 sums of 64·(64 + 128) products, another order


@pytest.mark.slow
def test_bf16_rows_give_the_gradients_of_their_f32_values():
  """k and v given as bf16 are converted as the kernel loads them: dk and dv (returned in bf16, k's and v's dtype)
  are the f32 values' gradients rounded to bf16, dβ equal."""
  k, v, *rest = problem(64, 64, 64, 2, seed=4)
  k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  dk, dv, dbeta = hopper_chunk_gradients(k, v, *rest, precision=DEFAULT)
  want_dk, want_dv, want_dbeta = hopper_chunk_gradients(k.astype(jnp.float32), v.astype(jnp.float32), *rest,
                                                        precision=DEFAULT)
  assert dk.dtype == dv.dtype == jnp.bfloat16
  np.testing.assert_array_equal(dk, want_dk.astype(jnp.bfloat16))
  np.testing.assert_array_equal(dv, want_dv.astype(jnp.bfloat16))
  np.testing.assert_array_equal(dbeta, want_dbeta)


@pytest.mark.slow
def test_scaling_holds_when_the_state_term_dominates():
  """State gradients 10^6 times the rows: each round's largest term sits at fp16's top, the others are scaled down
  with it and must neither overflow nor spoil the sum."""
  args = problem(64, 64, 64, 1, seed=3, state_scale=1e6, row_scale=1e-2)
  for got, want in zip(hopper_chunk_gradients(*args, precision=HIGHEST), chunk_gradients(*args, precision=HIGHEST)):
    assert max_abs(got, want) <= TOLERANCE[HIGHEST] * scale(want)


@pytest.mark.slow
def test_mesa_chunked_gradients_through_the_kernel(monkeypatch):
  """`PallasOperator.token_gradients` with the Hopper kernel forced (as on an H200): every gradient of mesa_chunked
  as the XLA path gives it."""
  chosen = []
  monkeypatch.setattr(pallas_operator, "use_hopper_gradients", lambda *_: chosen.append(True) or True)
  inputs = random_inputs(1, 96, 2, 64, 64, seed=5, with_state=True)
  loss = lambda impl: lambda *a: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(
      mesa_chunked(*a, chunk_size=64, cg_steps=4, impl=impl, matmul_precision="highest")))
  grads = jax.jit(jax.grad(loss("pallas"), argnums=range(7)))(*inputs)
  reference = jax.jit(jax.grad(loss("xla"), argnums=range(7)))(*inputs)
  assert chosen  # the backward asked for it
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
    assert max_abs(got, want) <= TOLERANCE[HIGHEST] * scale(want)


def test_refuses_what_it_cannot_take():
  assert unsupported_reason(32, 128, 128, 1).startswith("chunk_size=32")
  assert unsupported_reason(64, 32, 64, 1).startswith("key_dim=32")
  assert "304 KiB of shared memory" in unsupported_reason(64, 128, 128, 3)
  assert unsupported_reason(64, 128, 128, 1) is None and unsupported_reason(64, 64, 64, 3) is None


def test_chosen_for_sm90_gpu_kernels_only():
  device = lambda kind: jax.sharding.AbstractDevice(device_kind=kind, num_cores=132, platform="gpu")
  mesh = lambda kind: jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,),
                                                abstract_device=device(kind))
  with lowering_for("cpu"):
    assert not use_hopper_gradients(64, 128, 128, DEFAULT)  # interpret mode: the Triton-path kernel
  with lowering_for("gpu"):
    with jax.sharding.use_abstract_mesh(mesh("NVIDIA H200")):
      assert use_hopper_gradients(64, 128, 128, DEFAULT)
      assert not use_hopper_gradients(32, 128, 128, DEFAULT)  # the Triton kernel is faster at C = 32
      assert not use_hopper_gradients(64, 128, 128, HIGHEST)  # shared memory
      assert not use_hopper_gradients(64, 128, 128, lax.DotAlgorithmPreset.TF32_TF32_F32)
    with jax.sharding.use_abstract_mesh(mesh("NVIDIA A100-SXM4-80GB")):
      assert not use_hopper_gradients(64, 128, 128, DEFAULT)
