"""The analytic flop counts: per stage and their sums, on a size small enough to count by hand."""
from mesanet_jax.ops.flops import BACKWARD_STAGES, FORWARD_STAGES, mesa_chunked_flops, mesa_stage_flops


def test_stage_flops_sum_to_the_ops_flops_counted_by_hand():
  # C = Dk = Dv = 1: a state increment is 2 flops, a read 6, a solve of 2 steps 3 reads; T = 3 is 3 chunks.
  stages = mesa_stage_flops(1, 3, 1, 1, 1, chunk_size=1, cg_steps=2)
  assert stages == {"chunk states": 3 * 4, "solve": 3 * 18, "output read": 3 * 6, "adjoint rhs read": 3 * 6,
                    "state-gradient scans": 3 * 4, "token gradients": 3 * 30}
  assert mesa_chunked_flops(1, 3, 1, 1, 1, chunk_size=1, cg_steps=2) == 3 * (4 + 18 + 6)
  assert mesa_chunked_flops(1, 3, 1, 1, 1, chunk_size=1, cg_steps=2, backward=True) == 3 * (28 + 4 + 6 + 18 + 4 + 30)
  assert set(FORWARD_STAGES) | set(BACKWARD_STAGES) == set(stages)
  # Padding: T = 5 at C = 4 counts two chunks, two heads and batch 3 multiply.
  assert mesa_chunked_flops(3, 5, 2, 8, 4, chunk_size=4, cg_steps=5) == 6 * 2 * sum(
      mesa_stage_flops(1, 4, 1, 8, 4, chunk_size=4, cg_steps=5)[s] for s in FORWARD_STAGES)
