"""The language model: embedding, a stack of pre-norm blocks, tied read-out with a logit soft-cap; full forward,
prefill (returns the decoding cache) and one-token decoding, plus the parameter counter.

Init (paper G.2): fan-in normal everywhere; the mixer's output projection and the MLP's down-projection have their
variance scaled by 2/N (N blocks); the embedding has std 1/√d and is multiplied by √d on input (unit variance), or with
`LMConfig.embed_std` that std and no input scale.

Block stack (`make_blocks`, `run_blocks`): an nnx.List of N Blocks run by a Python loop, or with `scan_layers` one
Block whose params carry a leading "layers" axis, built by `nnx.vmap` and run by `jax.lax.scan` for training, prefill
and decoding alike (caches and CG step counts stacked on the layer axis), so the traced program holds one block
whatever N is. `remat` (LMConfig.remat) wraps in `jax.checkpoint` with `REMAT_POLICY` each block's training call
("full", inside the scan body) or one part of it ("mixer": norm + mixer; "mlp": norm + SwiGLU).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mesanet_jax import sharding
from mesanet_jax.layers.attention import Attention
from mesanet_jax.layers.gated_deltanet import GatedDeltaNet
from mesanet_jax.layers.hawk import HawkLayer
from mesanet_jax.layers.mesa import MesaLayer
from mesanet_jax.layers.mlp import SwiGLU
from mesanet_jax.layers.norm import RMSNorm
from mesanet_jax.layers.params import linear, param, scale_linear_init
from mesanet_jax.models.config import LMConfig, embedding_init_and_scale


def _make_mixer(config: LMConfig, name: str, rngs: nnx.Rngs):
  kw = dict(rngs=rngs, out_scale=2.0 / config.n_layers, dtype=config.dtype, param_dtype=config.param_dtype)
  if name == "mesa":
    return MesaLayer(config.d_model, config.mesa, **kw)
  if name == "gdn":
    return GatedDeltaNet(config.d_model, config.gdn, **kw)
  if name == "lru":
    return HawkLayer(config.d_model, config.lru, **kw)
  window = config.attention.window if name == "swa" else None
  return Attention(config.d_model, config.attention, window=window, **kw)


LAYERS = {nnx.PARTITION_NAME: "layers"}  # the stacked axis's logical name (sharding.RULES: never split)
# Save nothing inside a block: the backward pass keeps only each block's input [B, T, D] and recomputes the rest
# (one more forward, Mesa's CG solve included). Saving the matmuls instead (dots_with_no_batch_dims_saveable) would
# keep the q/k/v/gate and MLP projections, several times the residual stream, per block.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def _checkpointed(fn, module: nnx.Module, *args):
  """fn(module, *args) under `jax.checkpoint` with REMAT_POLICY, over the module's split state (plain JAX: see
  run_blocks)."""
  graphdef, state = nnx.split(module)
  return jax.checkpoint(lambda state, *args: fn(nnx.merge(graphdef, state), *args), policy=REMAT_POLICY)(state, *args)


def _on_batch(x: jax.Array) -> jax.Array:
  """Residual stream [B, T, D] (or [B, D] when decoding): split over the batch shards, features whole."""
  return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


class Block(nnx.Module):
  """x += mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

  def __init__(self, config: LMConfig, mixer: str, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.mixer = _make_mixer(config, mixer, rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.mlp = SwiGLU(config.d_model, config.mlp_ratio * config.d_model, out_scale=2.0 / config.n_layers, **kw)

  def __call__(self, x, cache=None):
    h, cache = self.mixer(self.mixer_norm(x), cache)
    return self._with_mlp(x + h), cache

  def train_call(self, x, remat: str = "none"):
    """`__call__` without a cache, with the mixer part (remat="mixer") or the MLP part ("mlp") recomputed in the
    backward pass instead of stored."""
    mixer = lambda block, x: block.mixer(block.mixer_norm(x))[0]
    mlp = lambda block, x: block.mlp(block.mlp_norm(x))
    x = x + (_checkpointed(mixer, self, x) if remat == "mixer" else mixer(self, x))
    return x + (_checkpointed(mlp, self, x) if remat == "mlp" else mlp(self, x))

  def forward_with_cg_steps(self, x):
    """`__call__` without a cache, and the forward CG steps of its Mesa mixer, (mean, max) f32 [2] (None for other
    mixers)."""
    if not isinstance(self.mixer, MesaLayer):
      return self(x)[0], None
    h, steps = self.mixer.forward_with_cg_steps(self.mixer_norm(x))
    return self._with_mlp(x + h), steps

  def _with_mlp(self, x):
    return x + self.mlp(self.mlp_norm(x))

  def decode(self, x, cache):
    h, cache, iters = self.mixer.decode(self.mixer_norm(x), cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x), fused=True), cache, iters

  def init_cache(self, batch: int, max_len: int):
    if isinstance(self.mixer, Attention):
      return self.mixer.init_cache(batch, max_len)
    return self.mixer.init_cache(batch)


def make_blocks(config: LMConfig, rngs: nnx.Rngs) -> nnx.Module:
  """An nnx.List of Blocks, or with `config.scan_layers` one Block with every param stacked on a leading axis."""
  if not config.scan_layers:
    return nnx.List([Block(config, name, rngs=rngs) for name in config.mixers])

  @nnx.vmap(transform_metadata=LAYERS)
  def stacked(key):
    return Block(config, config.mixers[0], rngs=nnx.Rngs(params=key))
  return stacked(jax.random.split(rngs.params(), config.n_layers))


def run_blocks(config: LMConfig, blocks: nnx.Module, step, x: jax.Array, per_layer=None, *, remat: bool = False):
  """x through every block by `step(block, x, layer_in) -> (x, layer_out)`; returns (x, layer outputs).

  per_layer / layer outputs: a tuple with one entry per block (None: Nones), or with `scan_layers` one pytree stacked
  on the layer axis. The scan and the remat are plain `jax.lax.scan` / `jax.checkpoint` over the blocks' split state
  (NNX's lifted transforms refuse a model merged outside an enclosing scan, as decoding loops do). Inside the scan a
  param's `out_sharding` still names the "layers" axis its slice no longer has; nothing reads it there.
  """
  def apply(block, x, layer_in):
    return _checkpointed(step, block, x, layer_in) if remat else step(block, x, layer_in)

  if config.scan_layers:
    graphdef, stacked = nnx.split(blocks)
    return jax.lax.scan(lambda x, xs: apply(nnx.merge(graphdef, xs[0]), x, xs[1]), x, (stacked, per_layer))
  outputs = []
  for block, layer_in in zip(blocks, per_layer or (None,) * len(blocks)):
    x, layer_out = apply(block, x, layer_in)
    outputs.append(layer_out)
  return x, tuple(outputs)


def train_blocks(config: LMConfig, blocks: nnx.Module, x: jax.Array) -> jax.Array:
  """x [B, T, D] through every block for training (no cache), rematerialised as `config.remat` says."""
  part = "none" if config.remat == "full" else config.remat  # "full": run_blocks checkpoints the whole block
  step = lambda block, x, _: (_on_batch(block.train_call(x, part)), None)
  return run_blocks(config, blocks, step, x, remat=config.remat == "full")[0]


def _forward_with_cg_steps(block: Block, x: jax.Array, _):
  x, steps = block.forward_with_cg_steps(x)
  return _on_batch(x), steps


def blocks_with_cg_steps(config: LMConfig, blocks: nnx.Module, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """x [B, T, D] through every block's training path (no remat: no backward pass) and the forward CG steps of every
  Mesa layer in block order, f32 [L, 2] (mean, max over the batch's tokens and heads; None without Mesa layers)."""
  x, steps = run_blocks(config, blocks, _forward_with_cg_steps, x)
  rows = [s.reshape(-1, 2) for s in jax.tree.leaves(steps)]
  return x, jnp.concatenate(rows) if rows else None


def embedding_table(config: LMConfig, rngs: nnx.Rngs) -> nnx.Param:
  """The [V, d] token embedding, initialised as `embedding_init_and_scale` says."""
  std, _ = embedding_init_and_scale(config)
  return param(rngs, nnx.initializers.normal(std), (config.vocab_size, config.d_model), config.param_dtype,
               ("vocab", "embed"))


def embed_tokens(config: LMConfig, table: nnx.Param, tokens: jax.Array) -> jax.Array:
  """tokens [B, T] -> their rows of `table` times the input scale, [B, T, d] in the residual stream's dtype
  (`LMConfig.stream_dtype`). The rows are gathered in the table's dtype and then cast, so the gradient's scatter-add
  into the table runs in it too: a bf16 scatter-add on a GPU (compare-and-swap loops) took 3.3 ms of a 12.9 ms MAD
  population step on an H100, an f32 one 0.1 ms (benchmarks/RESULTS.md "MAD step profile")."""
  _, scale = embedding_init_and_scale(config)
  dtype = config.stream_dtype
  return jnp.take(table[...], tokens, axis=0).astype(dtype) * np.asarray(scale, dtype)


class LanguageModel(nnx.Module):
  """tokens [B, T] int -> logits [B, T, V] f32. The cache is a tuple with one entry per block: RecurrentCache
  (conv states + MesaState or GDN state) for Mesa / GDN, HawkCache for the LRU, KVCache for attention; with `scan_layers` it is one
  such entry with every array stacked on a leading layer axis."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.d_model
    self.embed = embedding_table(config, rngs)
    self.blocks = make_blocks(config, rngs)
    self.final_norm = RMSNorm(d, eps=config.norm_eps, rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.unembed = None if config.tie_embeddings else linear(
        d, config.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    scale_linear_init(self, config.linear_init_variance)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    return _on_batch(embed_tokens(self.config, self.embed, tokens))

  def readout_weights(self) -> jax.Array:
    """The read-out matrix [V, D] in the compute dtype: the tied embedding, or the untied kernel transposed."""
    table = self.embed if self.unembed is None else self.unembed.kernel
    table = table[...].astype(self.config.dtype)
    return table if self.unembed is None else table.T

  def _logits(self, x: jax.Array) -> jax.Array:
    return self._read_out(self.final_norm(x))

  def _read_out(self, h: jax.Array) -> jax.Array:
    """The final norm's output [..., D] -> soft-capped logits [..., V] f32."""
    logits = jnp.einsum("...d,vd->...v", h, self.readout_weights(), preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))
    cap = self.config.logit_cap
    return logits if cap is None else jnp.tanh(logits / cap) * cap

  def hidden(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> the final norm's output [B, T, D] (compute dtype): `__call__` before the read-out, for
    losses that fuse the read-out (`train/chunked_ce.py`); logits = cap·tanh(hidden · readout_weightsᵀ / cap)."""
    return self.final_norm(train_blocks(self.config, self.blocks, self._embed(tokens)))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self._read_out(self.hidden(tokens))

  def forward_with_cg_steps(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """`__call__`'s logits and the forward CG steps of every Mesa layer in layer order, f32 [L, 2] (mean, max over
    the batch's tokens and heads; None without Mesa layers). A forward pass only: for evaluation (training reads
    the steps of both solves through `mesa.CGStepsProbe`)."""
    x, steps = blocks_with_cg_steps(self.config, self.blocks, self._embed(tokens))
    return self._logits(x), steps

  def init_cache(self, batch: int, max_len: int):
    """An empty cache; attention layers keep at most max_len (or window) positions, recurrent ones O(1) memory."""
    if self.config.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)
      return jax.vmap(lambda state: nnx.merge(graphdef, state).init_cache(batch, max_len))(stacked)
    return tuple(block.init_cache(batch, max_len) for block in self.blocks)

  def prefill(self, tokens: jax.Array, max_len: int, *, last_only: bool = False):
    """Runs the prompt [B, T] through the training path; returns logits [B, T, V] (with `last_only` the last
    position's, [B, V]: what generation needs, without the [B, T, V] read-out) and the cache after it."""
    x, cache = run_blocks(self.config, self.blocks, lambda block, x, cache: block(x, cache), self._embed(tokens),
                          self.init_cache(tokens.shape[0], max_len))
    return self._logits(x[:, -1] if last_only else x), cache

  def decode_step(self, token: jax.Array, cache) -> tuple[jax.Array, tuple, jax.Array | None]:
    """token [B] int -> logits [B, V], the new cache, and the CG steps used per batch element (mean over Mesa layers
    and heads, [B] f32; None when the model has no Mesa layer)."""
    def step(block, x, cache):
      x, cache, iters = block.decode(x, cache)
      return x, (cache, iters)
    x, outputs = run_blocks(self.config, self.blocks, step, self._embed(token), cache)
    cache, iters = outputs if self.config.scan_layers else tuple(zip(*outputs))
    # Per-layer [B, H] (loop) or [L, B, H] (scan) CG steps -> [layers, B, H].
    iters = [i.astype(jnp.float32).reshape(-1, *i.shape[-2:]) for i in jax.tree.leaves(iters)]
    cg_steps = jnp.mean(jnp.concatenate(iters), axis=(0, 2)) if iters else None
    return self._logits(x), cache, cg_steps


def count_params(config: LMConfig, *, verbose: bool = False) -> int:
  """Parameter count from abstract shapes (nothing is allocated); prints a per-module table when verbose."""
  abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  counts: dict[str, int] = {}
  for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    names = [str(p) for p in path if not str(p).isdigit()]  # blocks.0.mixer… and stacked blocks.mixer… alike
    group = ".".join(names[:2]) if path[0] == "blocks" else names[0]
    counts[group] = counts.get(group, 0) + int(np.prod(leaf.shape))
  total = sum(counts.values())
  if verbose:
    for group, n in counts.items():
      print(f"{group:32s} {n:>14,d}")
    print(f"{'total':32s} {total:>14,d}")
  return total
