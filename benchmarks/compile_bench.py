"""Compile time and compiled memory of one loss+grad step (no optimiser) of a preset LM, per depth, for the loop
over blocks vs `scan_layers`, each with and without `remat`. Abstract inputs: nothing is run or allocated.

  python benchmarks/compile_bench.py --size=tiny --arch=mesanet --depths=4,8,16 --batch=2 --length=64
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx

from mesanet_jax.models.config import preset
from mesanet_jax.models.lm import LanguageModel

_SIZE = flags.DEFINE_string("size", "tiny", "preset size")
_ARCH = flags.DEFINE_string("arch", "mesanet", "preset architecture (one mixer: scan_layers)")
_DEPTHS = flags.DEFINE_list("depths", ["4", "8", "16"], "numbers of blocks")
_BATCH = flags.DEFINE_integer("batch", 2, "sequences per step")
_LENGTH = flags.DEFINE_integer("length", 64, "tokens per sequence")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "activation dtype (params stay f32)")


def compiled_step(config, batch: int, length: int):
  """(seconds to lower and compile, compiled executable) of jit(value_and_grad(mean next-token CE))."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))

  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
  return time.perf_counter() - start, compiled


def main(argv):
  del argv
  base = preset(_SIZE.value, _ARCH.value, dtype=jnp.dtype(_DTYPE.value))
  print(f"{_SIZE.value} {_ARCH.value} batch {_BATCH.value} × {_LENGTH.value} {_DTYPE.value} on "
        f"{jax.devices()[0].device_kind}")
  print(f"{'blocks':>6s} {'scan':>5s} {'remat':>5s} {'compile s':>9s} {'temp MiB':>9s}")
  for depth in map(int, _DEPTHS.value):
    for scan in (False, True):
      for remat in (False, True):
        config = dataclasses.replace(base, mixers=base.mixers[:1] * depth, scan_layers=scan, remat=remat)
        seconds, compiled = compiled_step(config, _BATCH.value, _LENGTH.value)
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        print(f"{depth:6d} {scan!s:>5s} {remat!s:>5s} {seconds:9.1f} {temp:9.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
