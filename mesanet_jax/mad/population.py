"""A population of small models trained together in one jitted program: S slots, each holding one job (an
architecture on a variant at one lr and weight decay) of a group that shares the model's shapes (architecture,
read-out, sequence length; vocabularies padded to the group's largest, see `training.masked_logits`).

Params and optimiser states are stacked on a leading slot axis and every step is `jax.vmap`ped over the slots (a pure
function of nnx.split state, the plain-JAX form of `nnx.vmap`); per-slot hyperparameters (peak lr, weight decay,
schedule length) live in arrays, and `optax.inject_hyperparams` takes each slot's lr and decay at every step. The
group's datasets sit on the device ([D, N_max, L]); each slot draws its batches from its dataset's epoch permutation
on the device, and `train` runs many steps per call in one loop. A slot whose job is done (steps reached or early
stopped) is frozen until the host assigns it a new job (`assign`: fresh params and optimiser state, new arrays).
At its epoch ends the host evaluates a job on its test set (`evaluate`) and `keep_best` keeps the evaluation of
least test perplexity: the checkpoint whose accuracy mad-lab reports (`train.py`: ModelCheckpoint on
test/Perplexity_epoch, then `trainer.validate` of the best checkpoint).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mesanet_jax.mad import models, tasks, training
from mesanet_jax.models.config import LMConfig
from mesanet_jax.train.optimizer import decay_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
  """Device state of S slots (leading axis S everywhere)."""
  params: nnx.State
  opt_state: object
  step: jax.Array  # [S] int32: steps done by the slot's job
  total: jax.Array  # [S] int32: the job's steps (200 epochs)
  per_epoch: jax.Array  # [S] int32: steps per epoch
  dataset: jax.Array  # [S] int32: index into the group's datasets
  vocab: jax.Array  # [S] int32: the job's vocabulary size
  lr: jax.Array  # [S] f32 peak learning rate
  weight_decay: jax.Array  # [S] f32
  active: jax.Array  # [S] bool: holds an unfinished job
  order: jax.Array  # [S, N_max] int32: this epoch's permutation of the training examples
  key: jax.Array  # [S] PRNG keys (init and shuffling)
  # The job's checkpoint that mad-lab reports: the epoch-end evaluation of least test perplexity so far (`keep_best`).
  best_perplexity: jax.Array  # [S] f32 (inf before the first evaluation)
  best_accuracy: jax.Array  # [S] f32 macro accuracy at it
  best_accuracy_micro: jax.Array  # [S] f32
  best_loss: jax.Array  # [S] f32 test loss at it
  best_step: jax.Array  # [S] int32 the job's step at it


class Population:
  """The jitted programs of one group: `init`, `assign`, `train` and `evaluate` over S slots."""

  def __init__(self, config: LMConfig, autoencoder: bool, protocol: training.Protocol, slots: int,
               autoencoder_linear_std: float | None = None):
    self.config, self.autoencoder, self.protocol, self.size = config, autoencoder, protocol, slots
    self.autoencoder_linear_std = autoencoder_linear_std  # the autoencoder's init (`models.AutoEncoder`)
    abstract = nnx.eval_shape(lambda: self._model(nnx.Rngs(0)))
    self.graphdef, abstract_params = nnx.split(abstract)
    self.tx = training.optimizer(protocol, decay_mask(abstract_params, decay_embedding=protocol.decay_embedding))
    self.train = jax.jit(self._train, donate_argnums=0)  # num_steps traced: calls of any length share one program
    self.evaluate = jax.jit(self._evaluate)
    self.keep_best = jax.jit(self._keep_best, donate_argnums=0)
    self.assign = jax.jit(self._assign)
    self._fresh_members = jax.jit(jax.vmap(self._fresh))  # one program per population, not per `init` call

  def compiled_train(self, data: dict, num_examples: int):
    """`train` compiled for `data` and slots of `init(num_examples)`'s shapes (abstract: nothing is allocated), the
    program every call of any length then runs (its memory analysis, its HLO)."""
    return self.train.lower(jax.eval_shape(lambda: self.init(num_examples)), data, num_steps=1).compile()

  def precompile_evaluations(self, data: dict, num_examples: int) -> None:
    """Compiles `evaluate` and `keep_best` for each of `evaluation_sizes` (abstract slots of `init(num_examples)`'s
    shapes), so that no evaluation waits on a compile; the grid runs it in a thread as a group starts."""
    slots = jax.eval_shape(lambda: self.init(num_examples))
    for count in evaluation_sizes(self.size):
      index = jax.ShapeDtypeStruct((count,), jnp.int32)
      self.evaluate.lower(slots, data, index).compile()
      self.keep_best.lower(slots, jax.eval_shape(self.evaluate, slots, data, index), index).compile()

  def precompile(self, data: dict, num_examples: int) -> None:
    """Compiles `train` (as `compiled_train` does) and the evaluations (`precompile_evaluations`), so their first
    calls run at once; the grid runs it in a thread while another population trains."""
    self.compiled_train(data, num_examples)
    self.precompile_evaluations(data, num_examples)

  def _model(self, rngs: nnx.Rngs) -> nnx.Module:
    return models.make_model(self.config, self.autoencoder, rngs, self.autoencoder_linear_std)

  def _fresh(self, key: jax.Array):
    """(params, optimiser state) of one new member."""
    params = nnx.state(self._model(nnx.Rngs(params=key)))
    return params, self.tx.init(params)

  def init(self, num_examples: int, seed: int = 0) -> Slots:
    """S inactive slots (params initialised, nothing to train yet)."""
    keys = jax.random.split(jax.random.key(seed), self.size)
    params, opt_state = self._fresh_members(keys)
    zeros, real = jnp.zeros(self.size, jnp.int32), jnp.zeros(self.size)
    return Slots(params, opt_state, zeros, zeros + 1, zeros + 1, zeros, zeros + 1, real, real,
                 jnp.zeros(self.size, bool), jnp.zeros((self.size, num_examples), jnp.int32), keys,
                 real + jnp.inf, real, real, real, zeros)

  def _assign(self, slots: Slots, mask: jax.Array, total, per_epoch, dataset, vocab, lr, weight_decay,
              keys) -> Slots:
    """New jobs in the slots where mask [S] is set: fresh members from `keys`, the jobs' arrays, step 0."""
    params, opt_state = jax.vmap(self._fresh)(keys)
    pick = lambda new, old: jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    return Slots(jax.tree.map(pick, params, slots.params), jax.tree.map(pick, opt_state, slots.opt_state),
                 pick(0, slots.step), pick(total, slots.total), pick(per_epoch, slots.per_epoch),
                 pick(dataset, slots.dataset), pick(vocab, slots.vocab), pick(lr, slots.lr),
                 pick(weight_decay, slots.weight_decay), slots.active | mask, slots.order, pick(keys, slots.key),
                 pick(jnp.inf, slots.best_perplexity), pick(0.0, slots.best_accuracy),
                 pick(0.0, slots.best_accuracy_micro), pick(0.0, slots.best_loss), pick(0, slots.best_step))

  def _logits(self, params, inputs, vocab):
    return training.masked_logits(nnx.merge(self.graphdef, params)(inputs), vocab)

  def _member_step(self, params, opt_state, inputs, targets, vocab, lr, weight_decay):
    value, grads = jax.value_and_grad(lambda p: training.loss(self._logits(p, inputs, vocab), targets))(params)
    opt_state = training.with_hyperparams(opt_state, lr, weight_decay)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state, value

  def _shuffle(self, slots: Slots, starts: jax.Array, num_examples: jax.Array) -> jax.Array:
    """New epoch permutations where `starts` [S] is set: the slot's examples (its dataset's first n) in a random
    order from (key, epoch), the padding indices after them."""
    def permutation(key, epoch, n):
      noise = jax.random.uniform(jax.random.fold_in(key, epoch), (slots.order.shape[1],))
      return jnp.argsort(jnp.where(jnp.arange(slots.order.shape[1]) < n, noise, 2.0)).astype(jnp.int32)
    fresh = jax.vmap(permutation)(slots.key, slots.step // slots.per_epoch, num_examples)
    return jnp.where(starts[:, None], fresh, slots.order)

  def _train(self, slots: Slots, data: dict, num_steps: jax.Array) -> tuple[Slots, jax.Array]:
    """num_steps (a traced int: the grid's calls end at evaluations that move with the jobs in flight, and a static
    count would compile once per length) steps of every live slot; returns the slots and each slot's mean training
    loss over the steps it took in this call [S] (0 for a slot that took none)."""
    batch = self.protocol.batch_size

    def step(_, carry):
      slots, loss_sum, taken = carry
      live = slots.active & (slots.step < slots.total)
      position = slots.step % slots.per_epoch
      starts = live & (position == 0)
      order = jax.lax.cond(jnp.any(starts), lambda: self._shuffle(slots, starts, data["num_train"][slots.dataset]),
                           lambda: slots.order)
      rows = jnp.take_along_axis(order, position[:, None] * batch + jnp.arange(batch)[None], axis=1)
      inputs = data["train_inputs"][slots.dataset[:, None], rows]  # [S, B, L]
      targets = data["train_targets"][slots.dataset[:, None], rows]
      lr = jax.vmap(lambda s, p, t: training.learning_rate(s, p, t, self.protocol))(slots.step, slots.lr, slots.total)
      params, opt_state, value = jax.vmap(self._member_step)(slots.params, slots.opt_state, inputs, targets,
                                                             slots.vocab, lr, slots.weight_decay)
      keep = lambda new, old: jnp.where(live.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
      slots = dataclasses.replace(slots, params=jax.tree.map(keep, params, slots.params),
                                  opt_state=jax.tree.map(keep, opt_state, slots.opt_state),
                                  step=slots.step + live, order=order)
      return slots, loss_sum + jnp.where(live, value, 0.0), taken + live

    zeros = jnp.zeros(self.size)
    slots, loss_sum, taken = jax.lax.fori_loop(0, num_steps, step, (slots, zeros, zeros))
    return slots, loss_sum / jnp.maximum(taken, 1)

  def _batch_metrics(self, params, inputs, targets, vocab):
    """One member on one test batch [B, L]: (macro accuracy, correct tokens, loss)."""
    logits = self._logits(params, inputs, vocab)
    macro, correct = training.batch_accuracy(jnp.argmax(logits, -1), targets, logits.shape[-1])
    return macro, correct, training.loss(logits, targets)

  def _evaluate(self, slots: Slots, data: dict, index: jax.Array) -> dict:
    """The slots `index` [K] (e.g. those at an epoch end; `jnp.arange(S)`: all) on their variants' test sets in
    batches of 32: {"accuracy" (mad-lab's batch-mean macro accuracy), "accuracy_micro", "loss", "perplexity"
    (mad-lab's: the batch mean of exp(batch loss))}, each [K]. One compiled program per K."""
    params = jax.tree.map(lambda x: x[index], slots.params)
    vocab = slots.vocab[index]
    inputs = data["test_inputs"][slots.dataset[index]]  # [K, N_test, L]
    targets = data["test_targets"][slots.dataset[index]]
    count, batch, length = index.shape[0], self.protocol.batch_size, inputs.shape[2]
    num_batches = inputs.shape[1] // batch
    group = batches_per_step(num_batches, count * batch * length)
    # [K, N_test, L] -> [num_batches / group, group, K, batch, L]: a scan step forwards `group` batches of every slot
    split = lambda x: jnp.moveaxis(x[:, :num_batches * batch].reshape(count, -1, group, batch, length), 0, 2)
    metrics = jax.vmap(jax.vmap(self._batch_metrics), in_axes=(None, 0, 0, None))

    def batch_step(_, xs):
      return None, metrics(params, xs[0], xs[1], vocab)

    _, per_batch = jax.lax.scan(batch_step, None, (split(inputs), split(targets)))
    macro, correct, losses = (x.reshape(num_batches, count) for x in per_batch)
    scored = jnp.sum(targets != tasks.IGNORE, axis=(1, 2))
    return {"accuracy": jnp.mean(macro, 0), "accuracy_micro": jnp.sum(correct, 0) / jnp.maximum(scored, 1),
            "loss": jnp.mean(losses, 0), "perplexity": jnp.mean(jnp.exp(losses), 0)}

  def _keep_best(self, slots: Slots, metrics: dict, index: jax.Array) -> Slots:
    """The slots `index` [K] (at an epoch end; `evaluate`'s metrics of them, a repeated index with the same metrics)
    take these metrics as their best checkpoint where their perplexity is below the best so far (strictly, as
    Lightning's ModelCheckpoint(mode="min"))."""
    better = metrics["perplexity"] < slots.best_perplexity[index]
    keep = lambda field, new: field.at[index].set(jnp.where(better, new, field[index]))
    return dataclasses.replace(slots, best_perplexity=keep(slots.best_perplexity, metrics["perplexity"]),
                               best_accuracy=keep(slots.best_accuracy, metrics["accuracy"]),
                               best_accuracy_micro=keep(slots.best_accuracy_micro, metrics["accuracy_micro"]),
                               best_loss=keep(slots.best_loss, metrics["loss"]),
                               best_step=keep(slots.best_step, slots.step[index]))


# Tokens one scan step of an evaluation forwards at most (a train step's at L 128 × 64 slots): the test batches of a
# few due slots go through several at a time instead of one scan step each, whose dozens of small kernels would cost
# their launch latency more than their work.
EVALUATION_TOKENS = 1 << 18


def batches_per_step(num_batches: int, tokens_per_batch: int) -> int:
  """Test batches an evaluation's scan step forwards: the largest divisor of num_batches whose batches hold at most
  EVALUATION_TOKENS (tokens_per_batch: of one batch of every slot evaluated), at least 1."""
  fit = max(1, EVALUATION_TOKENS // tokens_per_batch)
  return max(d for d in range(1, num_batches + 1) if num_batches % d == 0 and d <= fit)


def evaluation_sizes(size: int) -> list[int]:
  """The numbers of slots a population of `size` evaluates at once (`evaluation_index`): each power of two below
  `size`, and `size`."""
  return [1 << k for k in range(size.bit_length()) if 1 << k < size] + [size]


def evaluation_index(due: list[int], size: int) -> list[int]:
  """The slots to evaluate when those `due` are at an epoch end: them, then the first of them again up to the least of
  `evaluation_sizes` that holds them, so that evaluations of any number of due slots take few distinct shapes (each
  compiled as a group starts: `Population.precompile_evaluations`)."""
  count = next(s for s in evaluation_sizes(size) if s >= len(due))
  return due + [due[0]] * (count - len(due))


def stack_datasets(datasets: list[dict], length: int, train_rows: int = 0) -> dict:
  """Device arrays of a group's datasets ({"train": {"inputs", "targets"}, "test": ...} each), right-padded to
  `length` with unscored positions (a causal model's outputs before them do not change) and to the largest N (of
  the training sets at least `train_rows`: a resumed population's epoch orders have the saving run's length)."""
  def pad(split, key):
    arrays = [d[split][key] for d in datasets]
    rows = max([a.shape[0] for a in arrays] + [train_rows if split == "train" else 0])
    fill = 0 if key == "inputs" else tasks.IGNORE
    out = np.full((len(arrays), rows, length), fill, np.int32)
    for i, a in enumerate(arrays):
      out[i, :a.shape[0], :a.shape[1]] = a
    return jnp.asarray(out)
  return {"train_inputs": pad("train", "inputs"), "train_targets": pad("train", "targets"),
          "test_inputs": pad("test", "inputs"), "test_targets": pad("test", "targets"),
          "num_train": jnp.asarray([d["train"]["inputs"].shape[0] for d in datasets], jnp.int32)}
