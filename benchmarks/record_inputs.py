"""Records the Mesa layer inputs of a trained checkpoint, for kernel benchmarks on realistic inputs.

    python benchmarks/record_inputs.py --workdir=runs/small --batch=8 --length=2048 --heads=16 --out=inputs.npz

Runs the run's held-out text through the model and keeps, for every Mesa layer, what its `mesa_chunked` call gets:
q, k, v [B, T, H, D], g, beta [B, T, H] and λ [H, D]. Heads are pooled over the layers ("layer-major": layer 0's
heads first) and --heads of them are kept, evenly spaced over the pool so that every depth is represented (deep
layers hold the heads with γ ≈ 1, whose systems need the most CG steps). The file is an npz with those six arrays
(f32; q, k, v hold the model's bf16 values when it computes in bf16) and `layers`, `heads`: where each head came from.
`benchmarks/ops_bench.py --inputs=FILE` (and kernel_bench.py, pallas_check.py) take it instead of random inputs.
Random inputs hide the conditioning that decides how many CG steps are needed.
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mesanet_jax.data import pipeline
from mesanet_jax.eval import runs
from mesanet_jax.layers.mesa import MesaLayer
from mesanet_jax.models.lm import run_blocks

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained language-model run", required=True)
_STEP = flags.DEFINE_integer("step", -1, "checkpoint step (-1: the latest)")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences")
_LENGTH = flags.DEFINE_integer("length", 2048, "tokens per sequence (the run's eval windows are joined or cut)")
_HEADS = flags.DEFINE_integer("heads", 16, "heads kept, evenly spaced over all layers' heads")
_OUT = flags.DEFINE_string("out", "mesa_inputs.npz", "output file")


def token_batch(run, batch: int, length: int) -> jax.Array:
  """[batch, length] int32 of the run's held-out windows, joined end to end and cut."""
  _, eval_source, _ = pipeline.make_sources(run.config.data)
  needed, rows = batch * length, []
  for window in pipeline.eval_batches(eval_source, batch, max(1, -(-needed // (batch * run.config.data.seq_len)))):
    rows.append(np.asarray(window["inputs"]).reshape(-1))
  stream = np.concatenate(rows)
  if stream.size < needed:
    stream = np.resize(stream, needed)  # a small held-out split repeats
  return jnp.asarray(stream[:needed].reshape(batch, length), jnp.int32)


def layer_inputs(model, tokens: jax.Array) -> list[tuple]:
  """(q, k, v, g, beta, lam) of every Mesa layer, in layer order."""
  def step(block, x, _):
    inputs = None
    if isinstance(block.mixer, MesaLayer):
      (q, k, v, g, beta), _, _ = block.mixer._inputs(block.mixer_norm(x), None)
      inputs = (q, k, v, g, beta, block.mixer.lam())
    return block(x)[0], inputs
  _, per_layer = jax.jit(lambda tokens: run_blocks(model.config, model.blocks, step, model._embed(tokens)))(tokens)
  if model.config.scan_layers:  # one pytree stacked on the layer axis
    return [jax.tree.map(lambda a: a[i], per_layer) for i in range(model.config.n_layers)]
  return [inputs for inputs in per_layer if inputs is not None]


def main(argv):
  del argv
  run = runs.load_run(_WORKDIR.value, None if _STEP.value < 0 else _STEP.value)
  model = runs.model_from(run.lm, run.params)
  layers = layer_inputs(model, token_batch(run, _BATCH.value, _LENGTH.value))
  if not layers:
    raise SystemExit(f"{_WORKDIR.value} has no Mesa layers")
  per_layer_heads = layers[0][0].shape[2]
  pool = len(layers) * per_layer_heads
  keep = np.unique(np.linspace(0, pool - 1, min(_HEADS.value, pool)).round().astype(int))
  which = [(int(i) // per_layer_heads, int(i) % per_layer_heads) for i in keep]
  take = lambda j, axis: np.stack([np.asarray(layers[l][j], np.float32).take(h, axis=axis) for l, h in which],
                                  axis=axis)
  arrays = {name: take(j, 0 if name == "lam" else 2).astype(np.float32)
            for j, name in enumerate(("q", "k", "v", "g", "beta", "lam"))}
  np.savez(_OUT.value, **arrays, layers=np.array([l for l, _ in which]), heads=np.array([h for _, h in which]))
  decay = np.exp(arrays["g"])
  print(f"wrote {_OUT.value}: step {run.step}, q {arrays['q'].shape}, heads from layers "
        f"{sorted(set(l for l, _ in which))}; γ mean {decay.mean():.4f}, share of γ > 0.999 "
        f"{(decay > 0.999).mean():.3f}; β mean {arrays['beta'].mean():.3f}; λ mean {arrays['lam'].mean():.3f}")


if __name__ == "__main__":
  app.run(main)
