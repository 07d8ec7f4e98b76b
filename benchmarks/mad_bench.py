"""Times MAD populations: ms per member-step of each architecture at the paper's MAD shapes (2 blocks, d 128, 8 × 16
heads, batch 32) for population sizes, sequence lengths and Mesa settings, on random tokens; one JSON line per case.

    python benchmarks/mad_bench.py --archs=mesanet,gdn,transformer,hawk,hawk_mesa --lengths=128,1024 \
        --slots=8,64 --mesa=xla:64,pallas:32,pallas:16 --dtypes=float32,bfloat16 --out=$OUT/mad_bench.jsonl

A case: one `Population.train` call of --steps steps compiled, then timed over --calls calls (blocking on the
result); a member-step is one optimiser step of one slot. Cases over --max_tokens tokens per step are skipped.
Each line is written as soon as it is measured, so a run cut short keeps what it timed.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mesanet_jax.mad import models, training
from mesanet_jax.mad.population import Population


def _data(length: int, vocab: int, examples: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(vocab, size=(1, examples, length + 1)).astype(np.int32)
  return {"train_inputs": jnp.asarray(tokens[..., :-1]), "train_targets": jnp.asarray(tokens[..., 1:]),
          "test_inputs": jnp.asarray(tokens[:, :64, :-1]), "test_targets": jnp.asarray(tokens[:, :64, 1:]),
          "num_train": jnp.asarray([examples], jnp.int32)}


def time_case(arch: str, length: int, slots: int, impl: str, chunk: int, dtype: str, steps: int, calls: int,
              vocab: int, cg_steps: int) -> dict:
  config = models.mad_config(arch, vocab, dtype=jnp.dtype(dtype).type, chunk_size=chunk, impl=impl,
                             cg_steps=cg_steps)
  population = Population(config, False, training.Protocol(), slots)
  data = _data(length, vocab, 4096)
  state = population.init(4096)
  state = population.assign(state, jnp.ones(slots, bool), total=jnp.full(slots, 10 ** 8),
                            per_epoch=jnp.full(slots, 4096 // 32), dataset=jnp.zeros(slots, jnp.int32),
                            vocab=jnp.full(slots, vocab), lr=jnp.full(slots, 1e-3), weight_decay=jnp.full(slots, 0.1),
                            keys=jax.random.split(jax.random.key(0), slots))
  start = time.perf_counter()
  state, loss = population.train(state, data, num_steps=steps)
  loss.block_until_ready()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(calls):
    state, loss = population.train(state, data, num_steps=steps)
  loss.block_until_ready()
  seconds = (time.perf_counter() - start) / (calls * steps)
  return {"arch": arch, "length": length, "slots": slots, "impl": config.mesa.impl, "chunk": config.mesa.chunk_size,
          "cg_steps": config.mesa.cg_steps_train, "dtype": dtype, "ms_per_step": 1e3 * seconds,
          "ms_per_member_step": 1e3 * seconds / slots, "tokens_per_s": slots * 32 * length / seconds,
          "compile_s": compile_s, "loss": float(jnp.mean(loss)), "device": jax.devices()[0].device_kind}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archs", default="mesanet,gdn,transformer,hawk,hawk_mesa")
  parser.add_argument("--lengths", default="128")
  parser.add_argument("--slots", default="8,64")
  parser.add_argument("--mesa", default="xla:64", help="Mesa impl:chunk settings (other archs use the first chunk)")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--cg_steps", type=int, default=0, help="0: the preset's (30)")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--vocab", type=int, default=64)
  parser.add_argument("--max_tokens", type=int, default=1 << 21)
  parser.add_argument("--out", default="mad_bench.jsonl")
  args = parser.parse_args()
  mesa = [(s.split(":")[0], int(s.split(":")[1])) for s in args.mesa.split(",")]
  for arch in args.archs.split(","):
    settings = mesa if "mesa" in arch else mesa[:1]
    for length in map(int, args.lengths.split(",")):
      for slots in map(int, args.slots.split(",")):
        if slots * 32 * length > args.max_tokens:
          continue
        for dtype in args.dtypes.split(","):
          for impl, chunk in settings:
            try:
              row = time_case(arch, length, slots, impl if "mesa" in arch else "", chunk, dtype, args.steps,
                              args.calls, args.vocab, args.cg_steps)
            except Exception as e:  # an out-of-memory or lowering failure ends one case, not the run
              row = {"arch": arch, "length": length, "slots": slots, "impl": impl, "chunk": chunk, "dtype": dtype,
                     "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
              f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
