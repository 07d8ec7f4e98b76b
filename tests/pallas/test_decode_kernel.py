"""The fused decode kernel (interpret mode on CPU) against `mesa_decode_step`, the XLA op it replaces: outputs, states,
solutions and CG step counts in f32 and f64; its lowering for GPU (Triton) and TPU (Mosaic) with the state in place."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesanet_jax.ops import MesaState, mesa_decode_step
from pallas_kernels.mesa_cg.decode import mesa_decode_fused
from pallas_kernels.mesa_cg.params import EXPORT_PLATFORMS, export_for
from tests.ops.mesa_inputs import max_abs, scale

# The kernel's products are exact f32 (multiply and reduce, no tensor-core passes) on every backend, like the op's
# precision="highest" einsums: only the order of the sums differs, amplified by cond(A) ≲ 1e2 through the solve.
# Measured on CPU: f32 ≤ 1e-6 of scale, f64 ≤ 1e-15.
TOLERANCE = {jnp.float32: 2e-5, jnp.float64: 1e-12}
CASES = [("f32", dict(cg_steps=12)), ("f32", dict(cg_steps=30, tol=1e-4)),
         ("f32", dict(cg_steps=30, tol=1e-3, cg_init="zero")), ("f32", dict(cg_steps=30, tol=1e-4, warm=True)),
         ("f64", dict(cg_steps=12)), ("f64", dict(cg_steps=30, tol=1e-4, warm=True))]


def _token(dtype):
  """One token for B=2, H=3, Dk=16, Dv=32 in the layer's ranges (as `tests.ops.mesa_inputs.random_inputs`, drawn
  with numpy: fast), a genuine state of 6 earlier tokens made slightly non-symmetric (a transposed matvec would be
  off by ~1e-3), and a previous solution: an earlier query solved against the state, zero for one (batch, head)."""
  rng = np.random.default_rng(4)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k, past_k = (unit(rng.normal(size=(2, 3, n, 16))) for n in (2, 1, 6))
  v, past_v = rng.normal(size=(2, 3, 1, 32)), rng.normal(size=(2, 3, 6, 32))
  g = -np.log1p(np.exp(-(rng.normal(size=(2, 3)) + 3.0)))  # log σ(N(3, 1))
  beta = 1 / (1 + np.exp(-rng.normal(size=(2, 3))))
  lam = 0.25 + np.log1p(np.exp(rng.normal(size=(3, 16))))
  h_kk = np.einsum("bhrk,bhrl->bhkl", past_k, past_k) + 1e-3 * rng.normal(size=(2, 3, 16, 16))
  h_kv = np.einsum("bhrk,bhrv->bhkv", past_k, past_v)
  previous = np.linalg.solve(h_kk + np.eye(16) * lam[:, None, :], q[:, :, 0, :, None])[..., 0]
  previous[1, 2] = 0.0
  cast = lambda x: jnp.asarray(x, dtype)
  token = [cast(q[:, :, 1]), cast(k[:, :, 0]), cast(v[:, :, 0]), cast(g), cast(beta)]
  return token, cast(lam), MesaState(cast(h_kk), cast(h_kv)), cast(previous)


@pytest.mark.parametrize("precision, options", CASES,
                         ids=[p + ":" + ",".join(f"{k}={v}" for k, v in o.items()) for p, o in CASES])
def test_kernel_matches_xla_decode_step(request, precision, options):
  if precision == "f64":
    request.getfixturevalue("x64")
  dtype, options = {"f32": jnp.float32, "f64": jnp.float64}[precision], dict(options)
  token, lam, state, previous = _token(dtype)
  previous = previous if options.pop("warm", False) else None
  kernel = jax.jit(lambda *a: mesa_decode_fused(*a, previous=previous, **options))
  o, new_state, iters, x = kernel(*token, lam, state)
  o_ref, state_ref, iters_ref, x_ref = mesa_decode_step(*token, lam, state, previous=previous, **options)
  assert o.dtype == o_ref.dtype and new_state.h_kk.dtype == state_ref.h_kk.dtype and iters.dtype == jnp.int32
  np.testing.assert_array_equal(iters, iters_ref)
  if "tol" in options:  # early stopping did stop early, at different steps for different heads
    assert 1 <= int(jnp.min(iters)) < int(jnp.max(iters)) < options["cg_steps"]
  for got, expected in ((o, o_ref), (new_state, state_ref), (x, x_ref)):
    assert max_abs(got, expected) <= TOLERANCE[dtype] * scale(expected)


def test_bf16_inputs_keep_f32_state_and_solution():
  token, lam, state, previous = _token(jnp.float32)
  o, new_state, _, x = mesa_decode_fused(*(t.astype(jnp.bfloat16) for t in token), lam, state, cg_steps=8,
                                         previous=previous)
  assert o.dtype == jnp.bfloat16 and new_state.h_kk.dtype == jnp.float32 and x.dtype == jnp.float32


@pytest.mark.parametrize("bad, message", [
    (dict(shape=(2, 3, 24)), r"impl='pallas' cannot decode this layer: key_dim=24"),
    (dict(previous=np.zeros((2, 3, 8))), r"previous must have shape \[B, H, Dk\] = \(2, 3, 16\)"),
    (dict(tol=-1.0), r"tol must be a positive float"),
])
def test_bad_arguments_raise_clear_errors(bad, message):
  token, lam, state, previous = _token(jnp.float32)
  if "shape" in bad:  # key and query dims of 24: not a power of two
    token = [jnp.zeros(bad["shape"])] * 2 + token[2:]
    lam, state = jnp.ones((3, 24)), MesaState(jnp.zeros((2, 3, 24, 24)), jnp.zeros((2, 3, 24, 32)))
  kwargs = dict(cg_steps=4, tol=bad.get("tol"), previous=bad.get("previous"))
  with pytest.raises(ValueError, match=message):
    mesa_decode_fused(*token, lam, state, **kwargs)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")  # known: DESIGN.md §5
@pytest.mark.parametrize("backend", EXPORT_PLATFORMS)
def test_lowers_with_the_state_and_solution_in_place(backend):
  _, custom_call = EXPORT_PLATFORMS[backend]
  # Dk = Dv = 128 as in the models; the tolerance loop and the warm start, the most the kernel traces.
  token, lam, state, previous = _token(jnp.float32)
  shapes = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
  args = (shapes(2, 3, 128), shapes(2, 3, 128), shapes(2, 3, 128), shapes(2, 3), shapes(2, 3), shapes(3, 128),
          MesaState(shapes(2, 3, 128, 128), shapes(2, 3, 128, 128)), shapes(2, 3, 128))
  step = lambda *a: mesa_decode_fused(*a[:-1], cg_steps=30, tol=1e-4, previous=a[-1])
  module = export_for(backend, step, *args).mlir_module()
  calls = [line for line in module.splitlines() if f"custom_call @{custom_call}(" in line]
  assert len(calls) == 1 and "mesa_decode_step" in module
  # Outputs 1, 2, 4 (h_kk, h_kv, x) are written into operands 7, 8, 9 (h_kk, h_kv, previous).
  aliases = re.findall(r"output_tuple_indices = \[(\d+)\], operand_index = (\d+)", calls[0])
  assert sorted(aliases) == [("1", "7"), ("2", "8"), ("4", "9")]
