"""Matmul flop counts of the chunked Mesa op (2 flops per multiply-add), for throughput and MFU reports."""


def mesa_chunked_flops(batch: int, length: int, heads: int, key_dim: int, value_dim: int, *, chunk_size: int,
                       cg_steps: int, backward: bool = False) -> int:
  """Flops of `mesa_chunked` forward, or forward + backward, as the XLA path computes them (T padded to C).

  Per chunk of C tokens: a state increment costs 2·C·Dk·D, a causal read or write with a Dk×D state costs
  2·C·Dk·D + 2·C²·Dk + 2·C²·D, a CG solve costs (cg_steps + 1) reads of the Dk×Dk state (the +1 is the initial
  residual).
  """
  c, dk, dv = chunk_size, key_dim, value_dim
  num_chunks = -(-length // chunk_size)
  state_increment = lambda d: 2 * c * dk * d
  read = lambda d: 2 * c * dk * d + 2 * c * c * dk + 2 * c * c * d
  solve = (cg_steps + 1) * read(dk)
  states = state_increment(dk) + state_increment(dv)
  forward = states + solve + read(dv)
  total = forward
  if backward:
    # recomputed states, u = H_kv do, adjoint solve, two state-gradient increments, four writes, H_kk x.
    total += states + read(dk) + solve + state_increment(dk) + state_increment(dv) + 3 * read(dk) + read(dv) + read(dk)
  return batch * heads * num_chunks * total
