"""Times Gated DeltaNet's operator, the chunked (WY) XLA form against the recurrent Pallas kernels, forward and
forward+backward on identical inputs in one process, with each variant's error against the token-by-token
recurrence (o and every input gradient, max |Δ| / max |reference|).

Variants: "xla:C[:triangular]" (`gated_delta_chunked`, chunk C, "solve" or "inverse") and "pallas:I[:warps]"
(`gated_delta_fused`, states kept every I tokens, Triton warps; 0: the default). Shapes are the MAD models' (8 heads
× 16); a population of S slots is batch S · 32. The device run:

    python benchmarks/gdn_bench.py --shapes=2048x128,1024x1024 --variants=xla:64,xla:32,xla:16,pallas:8,pallas:16,\
pallas:32,pallas:16:2 --out=$OUT/gdn_bench.jsonl
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_ms
from mesanet_jax.ops.gated_delta_rule import gated_delta_chunked, gated_delta_recurrent
from mesanet_jax.ops.operator import implementation


def make_inputs(batch: int, length: int, heads: int, dim: int, seed: int = 0) -> tuple:
  """Unit q, k; v ~ N(0, 1); γ = σ(N(2, 1)); β = σ(N(0, 1)); f32 (drawn with numpy, placed on the device)."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (unit(rng.standard_normal((batch, length, heads, dim))) for _ in range(2))
  v = rng.standard_normal((batch, length, heads, dim))
  g = -np.logaddexp(0.0, -(rng.standard_normal((batch, length, heads)) + 2.0))  # log σ
  beta = 1 / (1 + np.exp(-rng.standard_normal((batch, length, heads))))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta))


def operator(variant: str):
  """The op of a variant string: (q, k, v, g, beta) -> (o, state)."""
  kind, *options = variant.split(":")
  if kind == "xla":
    chunk, triangular = int(options[0]), (options[1] if len(options) > 1 else "solve")
    return lambda *a: gated_delta_chunked(*a, chunk_size=chunk, triangular=triangular)
  if kind == "pallas":
    fused = implementation("pallas", "gated_delta")
    interval, warps = int(options[0]), (int(options[1]) if len(options) > 1 else 0)
    return lambda *a: fused(*a, interval=interval, num_warps=warps or None)
  raise ValueError(f"variant {variant!r}: expected xla:C[:triangular] or pallas:I[:warps]")


def forward_and_backward(op, weights):
  """jit of (o, the gradients of Σ o · w w.r.t. q, k, v, g, beta)."""
  def loss(*args):
    o = op(*args)[0]
    return jnp.sum(o * weights), o
  return jax.jit(jax.grad(loss, argnums=range(5), has_aux=True))


def error(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="64x128", help="batch x length cases, comma-separated")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--dim", type=int, default=16, help="Dk = Dv")
  parser.add_argument("--variants", default="xla:64,xla:32,pallas:16")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="", help="JSONL file the rows are appended to")
  args = parser.parse_args()
  print("| B × T | variant | fwd ms | fwd+bwd ms | o err | max grad err (q, k, v, g, β) |\n|---|---|---|---|---|---|")
  for shape in args.shapes.split(","):
    batch, length = map(int, shape.split("x"))
    inputs = make_inputs(batch, length, args.heads, args.dim)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((batch, length, args.heads, args.dim)),
                          jnp.float32)
    grads_ref, o_ref = forward_and_backward(gated_delta_recurrent, weights)(*inputs)
    for variant in args.variants.split(","):
      op = operator(variant)
      forward = jax.jit(lambda *a, op=op: op(*a)[0])
      both = forward_and_backward(op, weights)
      grads, o = both(*inputs)
      row = {"batch": batch, "length": length, "heads": args.heads, "dim": args.dim, "variant": variant,
             "fwd_ms": median_ms(forward, *inputs, repeats=args.repeats),
             "fwd_bwd_ms": median_ms(both, *inputs, repeats=args.repeats),
             "o_error": error(o, o_ref), "grad_errors": [error(a, b) for a, b in zip(grads, grads_ref)],
             "device": jax.devices()[0].device_kind}
      print(f"| {batch} × {length} | {variant} | {row['fwd_ms']:.4g} | {row['fwd_bwd_ms']:.4g} | "
            f"{row['o_error']:.1e} | {' '.join(f'{e:.1e}' for e in row['grad_errors'])} |", flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
