"""Times one forward+backward pass (loss and gradients, no optimiser update) of a preset LM on whatever device JAX
sees, for each Mesa implementation, on identical random tokens.

  python benchmarks/model_bench.py --size=small --arch=mesanet --batch=8 --length=2048 --impls=xla,pallas
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx

from benchmarks.timing import median_ms
from mesanet_jax.models.config import preset
from mesanet_jax.models.lm import LanguageModel, count_params

_SIZE = flags.DEFINE_string("size", "tiny", "preset size")
_ARCH = flags.DEFINE_string("arch", "mesanet", "preset architecture")
_BATCH = flags.DEFINE_integer("batch", 2, "sequences per step")
_LENGTH = flags.DEFINE_integer("length", 128, "tokens per sequence")
_IMPLS = flags.DEFINE_string("impls", "xla", "comma-separated Mesa implementations to time, each impl[:chunk_size"
                             "[:matmul_precision]] (default: the preset's), e.g. xla,pallas,pallas:32:default")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "activation dtype (params stay f32)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed steps; the median is reported")


def loss_fn(model: LanguageModel, tokens: jax.Array) -> jax.Array:
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def grad_step(model: LanguageModel, tokens: jax.Array):
  return nnx.value_and_grad(loss_fn)(model, tokens)


def main(argv):
  del argv
  base = preset(_SIZE.value, _ARCH.value, dtype=jnp.dtype(_DTYPE.value))
  tokens = jax.random.randint(jax.random.key(0), (_BATCH.value, _LENGTH.value + 1), 0, base.vocab_size)
  print(f"device: {jax.devices()[0].device_kind}; {_SIZE.value} {_ARCH.value}, {count_params(base):,} params, "
        f"batch {_BATCH.value} x {_LENGTH.value}, {_DTYPE.value} activations")
  for entry in _IMPLS.value.split(","):
    impl, chunk_size, precision = (entry.split(":") + [base.mesa.chunk_size, base.mesa.matmul_precision])[:3]
    mesa = dataclasses.replace(base.mesa, impl=impl, chunk_size=int(chunk_size), matmul_precision=precision)
    config = dataclasses.replace(base, mesa=mesa)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    start = time.perf_counter()
    loss, _ = jax.block_until_ready(grad_step(model, tokens))
    compile_s = time.perf_counter() - start
    ms = median_ms(grad_step, model, tokens, repeats=_REPEATS.value)
    memory = jax.devices()[0].memory_stats() or {}
    peak = memory.get("peak_bytes_in_use")
    print(f"{entry:<18} loss {float(loss):.4f}  {ms:8.2f} ms/step  {_BATCH.value * _LENGTH.value / ms:9.1f} k tok/s"
          f"  first call {compile_s:.1f} s" + (f"  peak {peak / 2**30:.1f} GiB" if peak else ""), flush=True)


if __name__ == "__main__":
  app.run(main)
