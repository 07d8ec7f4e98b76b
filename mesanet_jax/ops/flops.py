"""Matmul flop counts of the chunked Mesa op (2 flops per multiply-add), per stage and in all, for throughput, MFU
and roofline reports."""

# The stages of the chunked operator (`operator.ChunkedOperator`) in the order a forward + backward runs them.
FORWARD_STAGES = ("chunk states", "solve", "output read")
BACKWARD_STAGES = ("chunk states", "adjoint rhs read", "solve", "state-gradient scans", "token gradients")


def mesa_stage_flops(batch: int, length: int, heads: int, key_dim: int, value_dim: int, *, chunk_size: int,
                     cg_steps: int) -> dict[str, int]:
  """Flops of one call of each stage of `mesa_chunked`'s operator, as the XLA path computes them (T padded to C).

  Per chunk of C tokens: a state increment costs 2·C·Dk·D, a causal read or write with a Dk×D state costs
  2·C·Dk·D + 2·C²·Dk + 2·C²·D, a CG solve costs (cg_steps + 1) reads of the Dk×Dk state (the +1 is the initial
  residual). The backward's token gradients: four writes and H_kk·x.
  """
  c, dk, dv = chunk_size, key_dim, value_dim
  state_increment = lambda d: 2 * c * dk * d
  read = lambda d: 2 * c * dk * d + 2 * c * c * dk + 2 * c * c * d
  per_chunk = {
      "chunk states": state_increment(dk) + state_increment(dv),
      "solve": (cg_steps + 1) * read(dk),
      "output read": read(dv),
      "adjoint rhs read": read(dk),
      "state-gradient scans": state_increment(dk) + state_increment(dv),
      "token gradients": 4 * read(dk) + read(dv),
  }
  return {stage: batch * heads * -(-length // chunk_size) * flops for stage, flops in per_chunk.items()}


def mesa_chunked_flops(batch: int, length: int, heads: int, key_dim: int, value_dim: int, *, chunk_size: int,
                       cg_steps: int, backward: bool = False) -> int:
  """Flops of `mesa_chunked` forward, or forward + backward (which recomputes the chunk states and runs the adjoint
  solve): the sum of its stages' `mesa_stage_flops`."""
  stages = mesa_stage_flops(batch, length, heads, key_dim, value_dim, chunk_size=chunk_size, cg_steps=cg_steps)
  return sum(stages[s] for s in FORWARD_STAGES + (BACKWARD_STAGES if backward else ()))
