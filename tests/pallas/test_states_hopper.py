"""The Hopper chunk-state scan (Pallas Mosaic GPU; interpreted on CPU, compiled on an sm_90 GPU) against the XLA
scan of the same increments in f64, forward and reversed, at both precisions and every tiling it takes, alone and as
two scans sharing a; lowered for CUDA in test_lowering.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mesanet_jax.ops.xla_operator import scan_chunks
from pallas_kernels.mesa_cg.params import lowering_for
from pallas_kernels.mesa_cg.states import chunk_states_sharing_a
from pallas_kernels.mesa_cg.states_hopper import hopper_chunk_states, unsupported_reason, use_hopper_states
from tests.ops.mesa_inputs import max_abs, scale

HIGHEST, DEFAULT = lax.Precision.HIGHEST, lax.Precision.DEFAULT
# One product of fp16 parts of operands scaled to the top of fp16's range per chunk (chunk.SplitDot): 3 passes keep
# ~22 bits (2.4e-7 of the operands' scale), 1 pass 11 bits (4.9e-4), summed over a few chunks with decays ≤ 1
# (measured on CPU: 4.5e-7 and 3.8e-4 of the states' scale).
TOLERANCE = {HIGHEST: 3e-6, DEFAULT: 2e-3}


def scan_problem(chunks, key_dim, value_dim, seed=0):
  """a [1, 2, N, 64, Dk], b [.., Dv], weights in (0, 1], chunk decays in (0, 1], an initial state, and the XLA
  scan's boundaries of the same increments in f64, both directions."""
  keys = jax.random.split(jax.random.key(seed), 5)
  a = jax.random.normal(keys[0], (1, 2, chunks, 64, key_dim))
  b = jax.random.normal(keys[1], (1, 2, chunks, 64, value_dim))
  weights = jax.random.uniform(keys[2], (1, 2, chunks, 64), minval=0.01)
  decay = jax.random.uniform(keys[3], (1, 2, chunks), minval=0.01)
  initial = jax.random.normal(keys[4], (1, 2, key_dim, value_dim))
  return (a, b, weights, decay, initial), {reverse: f64_scan(a, b, weights, decay, initial, reverse)
                                           for reverse in (False, True)}


def f64_scan(a, b, weights, decay, initial, reverse):
  """The XLA scan of a's and b's weighted products per chunk, all in f64."""
  with jax.enable_x64(True):
    f64 = lambda x: np.asarray(x, np.float64)
    increments = np.einsum("bhncd,bhnce->bhnde", f64(a) * f64(weights)[..., None], f64(b))
    return np.asarray(scan_chunks(jnp.asarray(increments), jnp.asarray(f64(decay)), jnp.asarray(f64(initial)),
                                  reverse=reverse))


def scan(a, b, weights, decay, initial, **kwargs):
  """One scan through `hopper_chunk_states`."""
  return hopper_chunk_states(a, (b,), (weights,), decay, (initial,), **kwargs)[0]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("precision, key_dim, value_dim, block, stages", [
    (DEFAULT, 128, 128, 64, None),  # the default tiling at fla's head size: 2 × 2 CTAs per batch·head, 3 stages
    (HIGHEST, 64, 128, 128, 2),  # a CTA takes the whole value dim
    (DEFAULT, 64, 64, 64, 3),  # more chunks in flight than the loop has after the first
    (HIGHEST, 64, 64, 64, 1),  # no chunk loaded ahead
])
def test_matches_the_f64_scan(reverse, precision, key_dim, value_dim, block, stages):
  args, expected = scan_problem(4, key_dim, value_dim)
  bounds = scan(*args, reverse=reverse, precision=precision, block=block, stages=stages)
  assert bounds.shape == (1, 2, 5, key_dim, value_dim) and bounds.dtype == jnp.float32
  assert max_abs(bounds, expected[reverse]) <= TOLERANCE[precision] * scale(expected[reverse])


@pytest.mark.parametrize("reverse, precision", [(False, DEFAULT), (True, HIGHEST)])
def test_scans_sharing_a_match_each_alone(reverse, precision):
  """Two scans in one kernel (the forward's H_kkᵀ and H_kv, the backward's state gradients: one a, two b's with their
  own weights and initial states): each against the f64 scan, as `chunk_states_sharing_a` runs them."""
  (a, b, weights, decay, initial), _ = scan_problem(3, 64, 64, seed=1)
  (_, b2, weights2, _, initial2), _ = scan_problem(3, 64, 64, seed=2)
  weights2 = -weights2  # as the state gradient of H_kk
  bounds = hopper_chunk_states(a, (b, b2), (weights, weights2), decay, (initial, initial2), reverse=reverse,
                               precision=precision)
  for got, (b_, w_, init_) in zip(bounds, [(b, weights, initial), (b2, weights2, initial2)]):
    expected = f64_scan(a, b_, w_, decay, init_, reverse)
    assert max_abs(got, expected) <= TOLERANCE[precision] * scale(expected)
  # Interpret mode takes one scan each (the Triton-path kernel, interpreted): the same states.
  each = chunk_states_sharing_a(a, (b, b2), (weights, weights2), decay, (initial, initial2), reverse=reverse,
                                precision=precision)
  for got, alone in zip(bounds, each):
    assert max_abs(got, alone) <= TOLERANCE[precision] * scale(alone)


def test_bf16_rows_scan_as_their_f32_values():
  """a and the b's given as bf16 (the forward's k and v from a bf16 model) land in shared memory as bf16 and are
  converted as the kernel loads them: the states are those of the same values given in f32, bit for bit."""
  (a, b, weights, decay, initial), _ = scan_problem(3, 64, 64)
  a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  scans = lambda a, b: hopper_chunk_states(a, (a, b), (weights, weights), decay, (initial, initial), precision=DEFAULT)
  for got, want in zip(scans(a, b), scans(a.astype(jnp.float32), b.astype(jnp.float32))):
    np.testing.assert_array_equal(got, want)


def test_each_chunk_scaled_on_its_own():
  """A chunk whose operands are 1e-6 of the next one's keeps its relative accuracy: the fp16 parts are scaled per
  chunk, so its state (the first boundary after it, from a zero start) neither underflows nor rounds to the later
  chunks' scale."""
  (a, b, weights, decay, initial), _ = scan_problem(3, 64, 64, seed=3)
  a = a.at[:, :, 0].multiply(1e-6)
  for precision in (HIGHEST, DEFAULT):
    bounds = scan(a, b, weights, decay, jnp.zeros_like(initial), precision=precision)
    small = jnp.einsum("bhcd,bhce->bhde", a[:, :, 0] * weights[:, :, 0, :, None], b[:, :, 0], precision="highest")
    assert max_abs(bounds[:, :, 1], small) <= TOLERANCE[precision] * scale(small)


def test_refuses_what_it_cannot_take():
  assert "takes 64" in unsupported_reason(32, 128, (128,), jnp.float32)
  assert "multiples of 64" in unsupported_reason(64, 96, (128,), jnp.float32)
  assert "multiples of the block" in unsupported_reason(64, 128, (64,), jnp.float32, block=128)
  assert "one value dim" in unsupported_reason(64, 128, (128, 64), jnp.float32)
  assert "f32 carries" in unsupported_reason(64, 128, (128,), jnp.float64)
  assert "shared memory" in unsupported_reason(64, 128, (128,), jnp.float32, block=128, passes=3, stages=3)
  # 16-bit rows land in half the memory
  assert unsupported_reason(64, 128, (128,), jnp.float32, block=128, passes=3, stages=3, row_bytes=2) is None
  assert unsupported_reason(64, 128, (128,), jnp.float32, block=128, passes=3, stages=2) is None
  assert unsupported_reason(64, 128, (128, 128), jnp.float32, passes=3) is None  # at 2 stages, the default there
  (a, b, weights, decay, initial), _ = scan_problem(1, 64, 64)
  with pytest.raises(ValueError, match="takes 64"):
    scan(a[:, :, :, :32], b[:, :, :, :32], weights[..., :32], decay, initial, precision=DEFAULT)


def test_chosen_for_sm90_gpu_kernels_only():
  device = lambda kind: jax.sharding.AbstractDevice(device_kind=kind, num_cores=132, platform="gpu")
  mesh = lambda kind: jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,),
                                                abstract_device=device(kind))
  with lowering_for("cpu"):
    assert not use_hopper_states(64, 128, (128,), jnp.float32, DEFAULT)  # interpret mode: the Triton-path kernel
  with lowering_for("gpu"):
    with jax.sharding.use_abstract_mesh(mesh("NVIDIA H200")):
      assert use_hopper_states(64, 128, (128, 128), jnp.float32, DEFAULT)
      assert use_hopper_states(64, 128, (128,), jnp.float32, HIGHEST)
      assert not use_hopper_states(32, 128, (128,), jnp.float32, DEFAULT)
      assert not use_hopper_states(64, 16, (16,), jnp.float32, DEFAULT)
      assert not use_hopper_states(64, 128, (128, 64), jnp.float32, DEFAULT)  # one scan each then, each Hopper
      assert not use_hopper_states(64, 128, (128,), jnp.float32, lax.DotAlgorithmPreset.BF16_BF16_F32_X3)
    with jax.sharding.use_abstract_mesh(mesh("NVIDIA A100-SXM4-80GB")):
      assert not use_hopper_states(64, 128, (128,), jnp.float32, DEFAULT)
