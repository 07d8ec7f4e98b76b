"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must precede jax's import).

Builds a tiny LM with one layer of every mixer, born sharded on a (data 1, fsdp 4, tensor 2) mesh, runs a jitted
forward and compares it with the same model on one device. Exits non-zero (AssertionError) on any mismatch.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from mesanet_jax import sharding
from mesanet_jax.layers.mesa import CGStepsProbe, add_cg_steps_probes, cg_steps_by_layer
from mesanet_jax.models.config import preset
from mesanet_jax.models.decoding import for_decoding
from mesanet_jax.models.lm import LanguageModel


def sharded(make_model, mesh) -> LanguageModel:
  """make_model()'s model with every param placed by `sharding.shardings` (the trainer's rule); placed from host
  copies, which are sliced in numpy (a device array's slicing compiles a program per shape and sharding)."""
  graphdef, state = nnx.split(make_model())
  return nnx.merge(graphdef, jax.device_put(jax.tree.map(np.asarray, state), sharding.shardings(state, mesh)))


def jitted_forward(model):
  """(a jitted (state, tokens) -> logits of `model`, its state): one program per model and input placement, where an
  eager forward compiles each of its ops (the references below: ~9 s eager, ~2 s jitted)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)), state


def main():
  assert jax.device_count() == 8, jax.devices()
  config = dataclasses.replace(preset("tiny"), mixers=("mesa", "gdn", "attention", "swa"))
  make = lambda: LanguageModel(config, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  model = sharded(make, mesh)
  specs = {
      "embed [vocab, embed]": (model.embed, P("tensor", "fsdp")),
      "mesa q_proj [embed, heads]": (model.blocks[0].mixer.q_proj.kernel, P("fsdp", "tensor")),
      "mesa λ [heads, kv]": (model.blocks[0].mixer.lam_param, P("tensor", None)),
      "mlp down [mlp, embed]": (model.blocks[1].mlp.down.kernel, P("tensor", "fsdp")),
  }
  for name, (variable, spec) in specs.items():
    assert variable[...].sharding.spec == spec, (name, variable[...].sharding)
  tokens = jax.random.randint(jax.random.key(1), (8, 20), 0, config.vocab_size)
  forward, state = jitted_forward(model)
  logits = forward(state, jax.device_put(tokens, sharding.batch_shardings(tokens, mesh)))
  forward, state = jitted_forward(make())
  reference = forward(state, tokens)  # unsharded: on the default device
  error = float(jnp.max(jnp.abs(logits - reference)))
  # Partitioned matmuls sum in another order: f32 rounding (measured ~1e-5 on logits of scale ~5).
  assert error < 1e-4, error
  print(f"sharded forward OK, max |Δlogit| = {error:.2e}")
  check_pallas_runs_per_shard(mesh)


def check_pallas_runs_per_shard(mesh):
  """impl="pallas" under `jax.set_mesh`: Mesa's and Gated DeltaNet's kernels run inside a shard_map over (batch,
  heads), same logits."""
  base = dataclasses.replace(preset("tiny"), mixers=("mesa", "gdn"))
  pallas = dataclasses.replace(base, mesa=dataclasses.replace(base.mesa, impl="pallas"),
                               gdn=dataclasses.replace(base.gdn, impl="pallas"))
  forward, state = jitted_forward(sharded(lambda: LanguageModel(pallas, rngs=nnx.Rngs(0)), mesh))
  tokens = jax.random.randint(jax.random.key(2), (8, 24), 0, base.vocab_size)
  with jax.set_mesh(mesh):
    sharded_tokens = jax.device_put(tokens, sharding.batch_shardings(tokens, mesh))
    traced = forward.trace(state, sharded_tokens)  # one trace for the jaxpr check and the run
    assert "shard_map" in str(traced.jaxpr)
    logits = traced.lower().compile()(state, sharded_tokens)
  # Activations pinned by sharding.constrain: logits [B, T, V] split over batch shards and vocab over tensor.
  assert logits.sharding.spec == P("fsdp", None, "tensor"), logits.sharding
  forward, state = jitted_forward(LanguageModel(base, rngs=nnx.Rngs(0)))
  reference = forward(state, tokens)  # impl="xla", one device
  error = float(jnp.max(jnp.abs(logits - reference)))
  assert error < 1e-4, error  # f32 rounding of the same math, as above
  print(f"pallas per-shard forward OK, max |Δlogit| = {error:.2e}")
  check_scanned_pallas(mesh)


def check_scanned_pallas(mesh):
  """scan_layers + remat with impl="pallas" and the chunk states saved for the backward (as the GPU fast path runs
  it): stacked params sharded with the layer axis whole, the per-shard kernel inside the scanned, rematerialised
  block, the loss of impl="xla" on one device and a finite gradient."""
  base = preset("tiny", scan_layers=True, remat=True)
  base = dataclasses.replace(base, mixers=base.mixers[:2], mesa=dataclasses.replace(base.mesa, cg_steps_train=8))
  pallas = dataclasses.replace(base, mesa=dataclasses.replace(base.mesa, impl="pallas", save_states=True))
  model = sharded(lambda: LanguageModel(pallas, rngs=nnx.Rngs(0)), mesh)
  assert model.blocks.mixer.q_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, base.vocab_size)
  loss = lambda model, tokens: jnp.mean(model(tokens) ** 2)
  graphdef, state = nnx.split(model)
  step = jax.jit(jax.value_and_grad(lambda s, t: loss(nnx.merge(graphdef, s), t)))
  with jax.set_mesh(mesh):
    sharded_tokens = jax.device_put(tokens, sharding.batch_shardings(tokens, mesh))
    traced = step.trace(state, sharded_tokens)
    assert "shard_map" in str(traced.jaxpr)
    value, grads = traced.lower().compile()(state, sharded_tokens)
  finite = jax.jit(lambda g: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(g)])))
  assert bool(finite(grads))  # one program, not two eager ops per gradient shape
  reference = float(loss(LanguageModel(base, rngs=nnx.Rngs(0)), tokens))  # impl="xla", one device, same init
  error = abs(float(value) - reference) / reference
  assert error < 1e-5, error  # f32 rounding (the kernel and the XLA op run the same CG steps)
  print(f"scanned pallas per-shard OK, loss rel. error {error:.1e}")
  check_pallas_decode_per_shard(mesh)
  check_cg_steps_probes_per_shard(mesh, base, tokens)


def check_pallas_decode_per_shard(mesh):
  """Decoding with impl="pallas" and the warm start under `jax.set_mesh`, with the weights `for_decoding` prepares
  inside the jit (fused projections of sharded kernels): the fused decode kernel runs inside a shard_map over (batch,
  heads); the logits of impl="xla" on one device."""
  base = dataclasses.replace(preset("tiny"), mixers=("mesa", "mesa"))
  base = dataclasses.replace(base, mesa=dataclasses.replace(base.mesa, decode_warm_start=True, decode_tol=1e-4))
  pallas = dataclasses.replace(base, mesa=dataclasses.replace(base.mesa, impl="pallas"))
  tokens = jax.random.randint(jax.random.key(4), (8, 12), 0, base.vocab_size)

  def decoder(model):
    """A jitted (state, tokens [B, 12]) -> logits [4, B, V] of decoding tokens 8..11 after prefilling 0..7."""
    graphdef, state = nnx.split(model)

    def step(model, cache, token):
      logits, cache, _ = model.decode_step(token, cache)
      return cache, logits

    @jax.jit
    def run(state, tokens):
      model = for_decoding(nnx.merge(graphdef, state))  # as `generate`: cast weights, fused projections
      _, cache = model.prefill(tokens[:, :8], max_len=12, last_only=True)
      return jax.lax.scan(lambda cache, token: step(model, cache, token), cache, tokens[:, 8:].T)[1]
    return run, state

  run, state = decoder(sharded(lambda: LanguageModel(pallas, rngs=nnx.Rngs(0)), mesh))
  with jax.set_mesh(mesh):
    sharded_tokens = jax.device_put(tokens, sharding.batch_shardings(tokens, mesh))
    traced = run.trace(state, sharded_tokens)
    assert str(traced.jaxpr).count("shard_map") >= 4  # 2 prefills, 2 decode steps
    logits = traced.lower().compile()(state, sharded_tokens)
  run_xla, state_xla = decoder(LanguageModel(base, rngs=nnx.Rngs(0)))  # impl="xla", one device, same init
  error = float(jnp.max(jnp.abs(logits - run_xla(state_xla, tokens))))
  assert error < 1e-3, error  # tol = 1e-4 CG on both paths: ~1e-4 of logits of scale ~5 (f32 rounding sets the steps)
  print(f"pallas per-shard decode OK, max |Δlogit| = {error:.2e}")


def check_cg_steps_probes_per_shard(mesh, base, tokens):
  """CG steps probes through the per-shard kernels (scanned, rematerialised, adaptive CG): the statistics over the
  whole batch, as impl="xla" reports them on one device (each shard's means and maxima are combined, not summed)."""
  base = dataclasses.replace(base, mesa=dataclasses.replace(base.mesa, cg_tol=1e-2))
  pallas = dataclasses.replace(base, mesa=dataclasses.replace(base.mesa, impl="pallas"))

  def steps(model, tokens):
    graphdef, params, probes = nnx.split(model, nnx.Param, CGStepsProbe)
    loss = lambda probes: jnp.mean(nnx.merge(graphdef, params, probes)(tokens) ** 2)
    return cg_steps_by_layer(jax.jit(jax.grad(loss))(probes))
  model = sharded(lambda: add_cg_steps_probes(LanguageModel(pallas, rngs=nnx.Rngs(0))), mesh)
  with jax.set_mesh(mesh):
    per_shard = steps(model, jax.device_put(tokens, sharding.batch_shardings(tokens, mesh)))
  reference = steps(add_cg_steps_probes(LanguageModel(base, rngs=nnx.Rngs(0))), tokens)
  assert bool(jnp.all(per_shard == reference)), (per_shard, reference)  # counts: equal (measured)
  print(f"per-shard CG steps probes OK: {per_shard.tolist()}")


if __name__ == "__main__":
  main()
