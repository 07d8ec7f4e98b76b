"""impl="pallas" forward and backward lower for TPU (Mosaic) and GPU (Triton) on this CPU host, through jax.export:
Pallas' own lowering runs (block shapes, loads and stores, dot forms, loops); the backend compilers do not. Likewise the
Hopper solve (Mosaic GPU)."""
import collections
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from mesanet_jax.ops import mesa_chunked
from mesanet_jax.ops.operator import BoundaryStates
from pallas_kernels.mesa_cg.gradients_hopper import hopper_chunk_gradients
from pallas_kernels.mesa_cg.params import EXPORT_PLATFORMS, export_for, triton_irs
from pallas_kernels.mesa_cg.solve_hopper import hopper_cg_solve
from pallas_kernels.mesa_cg.states_hopper import hopper_chunk_states
from tests.ops.mesa_inputs import random_inputs

KERNELS = ["mesa_chunk_states", "mesa_cg_solve", "mesa_causal_read", "mesa_chunk_states_reverse",
           "mesa_chunk_gradients"]


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")  # known: DESIGN.md §5
# With a tolerance the solve kernel's CG is a while loop; bf16 q, k, v reach the kernels as bf16 (`row_dtype`).
@pytest.mark.parametrize("cg_tol, row_dtype", [(None, jnp.float32), (1e-4, jnp.bfloat16)])
@pytest.mark.parametrize("backend", EXPORT_PLATFORMS)
def test_forward_and_backward_lower(backend, cg_tol, row_dtype):
  _, custom_call = EXPORT_PLATFORMS[backend]
  # Shapes no other test traces, so nothing traced for interpret mode is reused; heads too large for the solve to
  # fuse the reads (`solve.fuses_reads`), so that every kernel lowers.
  q, k, v, *rest = random_inputs(1, 48, 1, 32, 64, seed=9, with_state=True)
  args = (*(x.astype(row_dtype) for x in (q, k, v)), *rest)
  op = lambda *a: mesa_chunked(*a, chunk_size=16, cg_steps=2, cg_tol=cg_tol, impl="pallas")
  loss = lambda *a: sum(jnp.sum(x) for x in jax.tree.leaves(op(*a)))  # o and the final state: every kernel runs
  exported = export_for(backend, jax.value_and_grad(loss, argnums=range(7)), *args)
  module = exported.mlir_module()
  # Forward: two state scans, solve, read; backward: the same again, two reverse scans, the gradients (H_kk·x is
  # q − λ ⊙ x, no read).
  assert module.count(f"custom_call @{custom_call}(") == 11
  for kernel in KERNELS:
    assert kernel in module, kernel


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("backend", EXPORT_PLATFORMS)
def test_small_heads_solve_and_read_in_one_kernel_lower(backend):
  """At the MAD heads (16 × 16, `solve.fuses_reads`) the solves make o and u themselves: forward + backward lower
  with nine kernels and no read kernel, on GPU (Triton) and TPU (Mosaic)."""
  _, custom_call = EXPORT_PLATFORMS[backend]
  args = random_inputs(1, 48, 1, 16, 16, seed=10, with_state=True)
  op = lambda *a: mesa_chunked(*a, chunk_size=16, cg_steps=2, cg_tol=1e-4, impl="pallas")
  loss = lambda *a: sum(jnp.sum(x) for x in jax.tree.leaves(op(*a)))
  module = export_for(backend, jax.value_and_grad(loss, argnums=range(7)), *args).mlir_module()
  assert module.count(f"custom_call @{custom_call}(") == 9
  assert "mesa_causal_read" not in module and "mesa_cg_solve" in module


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("chunk_size, mosaic_kernels, mosaic_calls", [
    # the token gradients and the state scans stay Triton at C = 32 (faster there on an H200): the two solves
    (32, {"mesa_cg_solve"}, 2),
    # the two solves, the gradients and three scan kernels, each of two scans sharing a: the forward's H_kkᵀ and H_kv,
    # the backward's rebuild of both, its two state gradients
    (64, {"mesa_cg_solve", "mesa_chunk_gradients", "mesa_chunk_states", "mesa_chunk_states_reverse"}, 6),
])
def test_hopper_kernels_are_dispatched_on_sm90(chunk_size, mosaic_kernels, mosaic_calls):
  """On an (abstract) H200 the forward and the adjoint solve (and at C = 64 the token gradients and every chunk-state
  scan) of impl="pallas" run Mosaic GPU kernels where they take the sizes (Dk = 64), the other stages stay Triton
  kernels. q, k, v in bf16, as a bf16 model passes them."""
  q, k, v, *rest = random_inputs(1, 64, 1, 64, 64, seed=12)[:6]
  args = (*(x.astype(jnp.bfloat16) for x in (q, k, v)), *rest)
  op = lambda *a: mesa_chunked(*a, chunk_size=chunk_size, cg_steps=2, impl="pallas")
  loss = lambda *a: jnp.sum(op(*a)[0])
  module = export_for("gpu", jax.grad(loss, argnums=range(6)), *args).mlir_module()
  assert module.count("custom_call @mosaic_gpu_v2(") == mosaic_calls
  triton_kernels = set(re.findall(r'name = "(mesa_\w+)"', module))
  assert triton_kernels == set(KERNELS) - mosaic_kernels, triton_kernels


@pytest.mark.slow  # two exports of forward + backward, ~19 s on one core
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_reads_come_out_of_the_hopper_solve_at_one_pass():
  """At "default" (one fp16 pass) on an (abstract) H200 the Hopper solves make the forward's o (after the loop) and
  the adjoint's right-hand side u (before it): no causal-read kernel runs in forward + backward (H_kk·x is q − λ ⊙
  x); at "highest" the read kernel makes both.
  Dv ≠ Dk, so that no two reads have the same operand shapes (the module would hold one function for both)."""
  args = random_inputs(1, 64, 1, 64, 128, seed=12)[:6]

  def read_kernels(precision):
    op = lambda *a: mesa_chunked(*a, chunk_size=64, cg_steps=2, impl="pallas", matmul_precision=precision)
    loss_and_grads = jax.value_and_grad(lambda *a: jnp.sum(op(*a)[0]), argnums=range(6))  # o is used, not DCE'd
    return len(re.findall(r'name = "mesa_causal_read"', export_for("gpu", loss_and_grads, *args).mlir_module()))
  assert read_kernels("default") == 0
  assert read_kernels("highest") == 2


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_vmapped_kernels_take_the_population_axis_into_their_grid():
  """The MAD population vmaps every member's step over its S slots (`mad/population.py`): pallas_call's batching rule
  must make the slot axis a grid axis of each kernel (one launch, results [S, ...]), not a loop of S launches."""
  slots = 3
  member = random_inputs(2, 32, 2, 16, 16, seed=11)[:6]  # the MAD head size; no initial state, as in the model
  stacked = [jnp.stack([x] * slots) for x in member]
  op = lambda *a: mesa_chunked(*a, chunk_size=16, cg_steps=2, impl="pallas")
  loss = lambda *a: sum(jnp.sum(x) for x in jax.tree.leaves(op(*a)))  # o and the final state: every kernel runs
  module = export_for("gpu", jax.vmap(jax.value_and_grad(loss, argnums=range(6))), *stacked).mlir_module()
  calls = [line for line in module.splitlines() if "custom_call @__gpu$xla.gpu.triton(" in line]
  assert len(calls) == 9  # the two reads made inside the solves (`solve.fuses_reads`: the MAD heads)
  for call in calls:  # the launch grid's last axis is the vmapped one; every result is [S, B·H, ...]
    assert f"grid_z = {slots} : i32" in call and re.search(rf"-> \(?tensor<{slots}x{2 * 2}x", call), call[-300:]


@pytest.mark.parametrize("chunk, key_dim, cg_init, cg_tol, precision, lhs_in_registers, cg_preconditioner", [
    (32, 128, "jacobi", None, jax.lax.Precision.HIGHEST, True, "none"),  # C padded to 64 rows; the GPU default
    (64, 64, "zero", 1e-4, jax.lax.Precision.DEFAULT, False, "none"),  # a while loop; the steps written out
    (64, 128, "zero", 1e-4, jax.lax.Precision.DEFAULT, True, "jacobi"),  # 1 / diag(A) from shared memory per step
])
def test_hopper_solve_lowers_for_cuda(chunk, key_dim, cg_init, cg_tol, precision, lhs_in_registers,
                                      cg_preconditioner):
  """Mosaic GPU's own lowering (layout inference, wgmma, TMA, barriers) runs for sm_90; ptxas does not."""
  rows = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (rows(1, 2, 3, chunk, key_dim), rows(1, 2, 3, chunk, key_dim), rows(1, 2, 3, chunk), rows(1, 2, 3, chunk),
          rows(2, key_dim), rows(1, 2, 4, key_dim, key_dim))
  solve = functools.partial(hopper_cg_solve, cg_steps=3, cg_init=cg_init, cg_tol=cg_tol, precision=precision,
                            lhs_in_registers=lhs_in_registers, cg_preconditioner=cg_preconditioner)
  kernel_operands = _mosaic_gpu_operand_types(export_for("gpu", solve, *args).mlir_module())
  assert len(kernel_operands) == 1
  # The 4 boundary states go in whole (the kernel reads chunk n's in place: a slice would copy them all).
  assert f"tensor<2x4x{key_dim}x{key_dim}xf32>" in kernel_operands[0]


@pytest.mark.parametrize("chunk, key_dim, value_dim, lhs_in_registers, cg_preconditioner, x_in_shared_memory, "
                         "row_dtype, token_major", [
    # the GPU default's forward: left operands (x̂, Ẑ) in registers, x in shared memory; q, k, v as a bf16 model gives
    # them, q read (and o written) token-major
    (64, 128, 128, True, "none", None, jnp.bfloat16, True),
    (64, 128, 128, True, "jacobi", None, jnp.float32, False),  # 1 / diag(A) in shared memory beside the read's
    (32, 64, 64, False, "none", None, jnp.float16, True),  # pairs of chunks (q padded to 4 · 64 tokens), staged
    (64, 128, 128, True, "none", False, jnp.float32, False),  # x through the CG loop in registers
])
def test_hopper_solve_with_the_read_lowers_for_cuda(chunk, key_dim, value_dim, lhs_in_registers, cg_preconditioner,
                                                     x_in_shared_memory, row_dtype, token_major):
  """The solve that also makes o (`read=`) through Mosaic GPU's lowering for sm_90, with the boundary states whole
  and the rows (rhs, k, v) in their own dtype, converted as the kernel loads them."""
  rows = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  rhs_shape = (1, 3 * chunk, 2, key_dim) if token_major else (1, 2, 3, chunk, key_dim)
  args = (rows(*rhs_shape, dtype=row_dtype), rows(1, 2, 3, chunk, key_dim, dtype=row_dtype),
          rows(1, 2, 3, chunk), rows(1, 2, 3, chunk), rows(2, key_dim), rows(1, 2, 4, key_dim, key_dim),
          rows(1, 2, 3, chunk, value_dim, dtype=row_dtype), rows(1, 2, 4, key_dim, value_dim))
  solve = lambda *a: hopper_cg_solve(*a[:6], cg_steps=3, cg_init="jacobi", cg_tol=1e-4,
                                     cg_preconditioner=cg_preconditioner, precision=jax.lax.Precision.DEFAULT,
                                     lhs_in_registers=lhs_in_registers, x_in_shared_memory=x_in_shared_memory,
                                     read=a[6:], token_major=token_major)
  kernel_operands = _mosaic_gpu_operand_types(export_for("gpu", solve, *args).mlir_module())
  assert len(kernel_operands) == 1
  assert f"tensor<2x4x{key_dim}x{value_dim}xf32>" in kernel_operands[0]
  # rhs, k and v reach the kernel in their own dtype (no f32 copy made outside), 64 rows a program; a token-major
  # rhs as [B, tokens, H, Dk] (no chunk-major copy)
  element = {jnp.bfloat16: "bf16", jnp.float16: "f16", jnp.float32: "f32"}[row_dtype]
  row_types = [f"x64x{width}x{element}>" for width in (key_dim, value_dim) + (() if token_major else (key_dim,))]
  assert all(kernel_operands[0].count(row_type) >= row_types.count(row_type) for row_type in row_types)
  if token_major:
    assert f"tensor<1x{64 * -(-3 * chunk // 64)}x2x{key_dim}x{element}>" in kernel_operands[0]


@pytest.mark.parametrize("chunk, key_dim, value_dim, precision, row_dtype, with_states", [
    # fla's head size, k and v as a bf16 model gives them, ⟨D, S⟩ too (as the backward asks)
    (64, 128, 128, jax.lax.Precision.DEFAULT, jnp.bfloat16, True),
    (64, 64, 128, jax.lax.Precision.HIGHEST, jnp.float32, False),
])
def test_hopper_gradients_lower_for_cuda(chunk, key_dim, value_dim, precision, row_dtype, with_states):
  """Mosaic GPU's own lowering of the token-gradients kernel runs for sm_90; ptxas does not."""
  rows = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  bounds = (rows(1, 2, 4, key_dim, key_dim), rows(1, 2, 4, key_dim, value_dim)) * (2 if with_states else 1)
  args = (rows(1, 2, 3, chunk, key_dim, dtype=row_dtype), rows(1, 2, 3, chunk, value_dim, dtype=row_dtype),
          rows(1, 2, 3, chunk, key_dim),
          rows(1, 2, 3, chunk, key_dim), rows(1, 2, 3, chunk, value_dim), rows(1, 2, 3, chunk), rows(1, 2, 3, chunk),
          *bounds)
  gradients = lambda *a: hopper_chunk_gradients(*a[:9], precision=precision,
                                                states=BoundaryStates(*a[9:]) if with_states else None)
  kernel_operands = _mosaic_gpu_operand_types(export_for("gpu", gradients, *args).mlir_module())
  assert len(kernel_operands) == 1
  # The state gradients (and states) go in whole, all 4 boundaries (the kernel reads entry m + 1 in place: [1:] would
  # copy them).
  each = (2 if with_states else 1) * (2 if key_dim == value_dim else 1)  # H_kk's shape is H_kv's where Dk = Dv
  for shape in (f"tensor<2x4x{key_dim}x{key_dim}xf32>", f"tensor<2x4x{key_dim}x{value_dim}xf32>"):
    assert kernel_operands[0].count(shape) == each, shape


@pytest.mark.parametrize("key_dim, value_dim, scans, block, precision, reverse, row_dtype", [
    # the forward's two scans at fla's head size, 3 stages, on k and v as a bf16 model gives them
    (128, 128, 2, 64, jax.lax.Precision.DEFAULT, False, jnp.bfloat16),
    (128, 128, 2, 64, jax.lax.Precision.HIGHEST, True, jnp.float32),  # the backward's two at three passes: 2 stages
    (64, 128, 1, 128, jax.lax.Precision.HIGHEST, True, jnp.float32),  # three passes, the whole value dim a CTA
])
def test_hopper_state_scan_lowers_for_cuda(key_dim, value_dim, scans, block, precision, reverse, row_dtype):
  """Mosaic GPU's own lowering of the chunk-state scan (TMA loads into landing slots, barriers, transposed wgmma
  operand, TMA stores) runs for sm_90; ptxas does not."""
  rows = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  args = (rows(1, 2, 3, 64, key_dim, dtype=row_dtype), (rows(1, 2, 3, 64, value_dim, dtype=row_dtype),) * scans,
          (rows(1, 2, 3, 64),) * scans, rows(1, 2, 3), (rows(1, 2, key_dim, value_dim),) * scans)
  scan = functools.partial(hopper_chunk_states, precision=precision, block=block, reverse=reverse)
  kernel_operands = _mosaic_gpu_operand_types(export_for("gpu", scan, *args).mlir_module())
  assert len(kernel_operands) == 1
  element = {jnp.bfloat16: "bf16", jnp.float32: "f32"}[row_dtype]  # a and the b's land in their own dtype
  assert kernel_operands[0].count(f"tensor<2x3x64x{value_dim}x{element}>") == scans + (key_dim == value_dim)
  assert kernel_operands[0].count(f"tensor<2x{key_dim}x{value_dim}xf32>") == scans  # the initial states


@pytest.mark.slow  # two exports, ~10 s on one core
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_a_forward_no_gradient_is_taken_of_does_not_write_x():
  """Without a gradient the op's custom VJP runs its primal, which asks the Hopper solve for o alone: x ([B·H,
  programs, 64, Dk] f32) is not among the kernel's results; with one, x is (the backward's residual)."""
  args = random_inputs(1, 64, 1, 64, 128, seed=12)[:6]
  op = lambda *a: mesa_chunked(*a, chunk_size=64, cg_steps=2, cg_tol=1e-4, impl="pallas", matmul_precision="default")
  results = lambda f: " ".join(_mosaic_gpu_result_types(export_for("gpu", f, *args).mlir_module()))
  x_type = "tensor<1x1x64x64xf32>"
  assert x_type not in results(lambda *a: op(*a)[0])
  assert x_type in results(jax.grad(lambda *a: jnp.sum(op(*a)[0]), argnums=range(6)))


def _mosaic_gpu_result_types(module: str) -> list[str]:
  """The result types of every Mosaic GPU call in an exported module's text."""
  calls = [line for line in module.splitlines() if "custom_call @mosaic_gpu_v2(" in line]
  return [line.rsplit(") -> ", 1)[-1] for line in calls]


def _mosaic_gpu_operand_types(module: str) -> list[str]:
  """The operand types, "(tensor<...>, ...)", of every Mosaic GPU call in an exported module's text."""
  calls = [line for line in module.splitlines() if "custom_call @mosaic_gpu_v2(" in line]
  return [re.search(r"\} : (\(.*?\)) ->", line).group(1) for line in calls]


@pytest.mark.slow  # three exports of forward + backward, ~7 s on one core
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_gpu_dots_take_the_precisions_operands():
  """f32 dots in the Triton kernels (abstract H200): "highest" and "default" as scaled fp16 parts (three and one
  pass, `chunk.SplitDot`), "high" as Triton's three bf16 passes (no scaling)."""
  args = random_inputs(1, 32, 1, 16, 16, seed=13)[:6]

  def operand_types(precision):
    op = lambda *a: mesa_chunked(*a, chunk_size=16, cg_steps=2, impl="pallas", matmul_precision=precision)
    irs = triton_irs(jax.grad(lambda *a: jnp.sum(op(*a)[0]), argnums=range(6)), *args)
    assert set(irs) == set(KERNELS) - {"mesa_causal_read"}  # 16 × 16 heads: the solves make both reads
    dots = [re.findall(r"tt\.dot [^\n]*: tensor<\w+x(\w+)>", ir) for ir in irs.values()]
    assert all(dots), "every kernel has dots"
    return {operand for kernel in dots for operand in kernel}, sum(map(len, dots))

  (highest, highest_dots), (high, high_dots), (default, default_dots) = map(operand_types, ["highest", "high",
                                                                                           "default"])
  assert highest == {"f16"} and high == {"bf16"} and default == {"f16"}
  assert highest_dots == high_dots == 3 * default_dots  # three passes against one


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("chunk_size, dim, warps", [
    (32, 16, {1: 9}),  # the MAD heads: one warp per program, 2x faster solves than 4 (RESULTS.md)
    (32, 128, {4: 6, 8: 1}),  # the LM heads: as measured before; the gradients kernel 8, the solves Mosaic GPU
])
@pytest.mark.slow  # compiles over ~8 s on one core
def test_triton_warps_follow_the_tile_size(chunk_size, dim, warps):
  """The Triton kernels of forward + backward on an abstract H200 get `params.default_warps` of their tiles."""
  args = random_inputs(1, 2 * chunk_size, 1, dim, dim, seed=13)[:6]
  op = lambda *a: mesa_chunked(*a, chunk_size=chunk_size, cg_steps=2, impl="pallas")
  module = export_for("gpu", jax.grad(lambda *a: jnp.sum(op(*a)[0]), argnums=range(6)), *args).mlir_module()
  assert collections.Counter(int(n) for n in re.findall(r"num_warps = (\d+)", module)) == warps
