"""Trains the MAD grid as the MesaNet paper ran it: `mesanet-mad-grid` or `python -m experiments.mad_grid`.

    mesanet-mad-grid --results=runs/mad/results.jsonl                                  # everything: 5 × 66 × 8 jobs
    mesanet-mad-grid --architectures=mesanet,gdn --tasks=memorize,compress --time_limit=420
    mesanet-mad-grid --tasks=selective_copy --variants=baseline,seq_len=512 --architectures=transformer

Each (architecture, task, variant, lr, weight decay) is trained for 200 epochs (mesanet_jax/mad/training.py), all
jobs sharing model shapes at once as one population (mesanet_jax/mad/population.py), and appended to --results as
it finishes; a rerun skips the finished ones. With --time_limit (or at a SIGTERM) the run stops, saving the
populations in flight under --state_dir for the next run (in files of at most 16 MiB; --state_budget_mib bounds
the directory's saves together, each group keeping its slots furthest along). Each group run's device time goes to
--usage (usage.jsonl beside --results). Several runs may share --results and --state_dir (one per GPU): each
trains the groups no other holds (mesanet_jax/mad/claims.py). Table and device hours: `mesanet-mad-table --results=...`.
"""
import dataclasses
import os

from absl import app, flags

from mesanet_jax.train.sigterm import SigtermFlag

from . import cli

SIGTERM = SigtermFlag()  # before the slow imports: a SIGTERM saves the population in flight and exits 0

_RESULTS = flags.DEFINE_string("results", "runs/mad/results.jsonl", "JSONL of finished jobs (appended; resumed)")
_ARCHITECTURES = flags.DEFINE_list("architectures", ["mesanet", "gdn", "transformer", "hawk", "hawk_mesa"],
                                   "architectures, trained in this order")
_TASKS = flags.DEFINE_list("tasks", [], "tasks (default: all six)")
_VARIANTS = flags.DEFINE_list("variants", [], "variant names such as baseline,vocab_size=32 (default: all)")
_LRS = flags.DEFINE_list("lrs", ["3e-3", "1e-3", "5e-4", "1e-4"], "peak learning rates")
_WDS = flags.DEFINE_list("weight_decays", ["0.01", "0.1"], "weight decays")
_EPOCHS = flags.DEFINE_integer("epochs", 200, "epochs per job (the paper: 200)")
_DECAY_EMBEDDING = flags.DEFINE_bool("decay_embedding", False, "weight decay on the embedding table too (mad-lab's "
                                     "AdamW: every parameter but biases and norms); default: the paper's LM mask "
                                     "(matrices but the embedding)")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 0, "> 0: at most this many training and test examples per "
                                     "variant, a multiple of 32 (smoke runs)")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "dataset cache (default: <results dir>/data)")
_STATE_DIR = flags.DEFINE_string("state_dir", "", "populations in flight at the time limit (default: "
                                 "<results dir>/state)")
_STATE_BUDGET = flags.DEFINE_float("state_budget_mib", 0, "MiB --state_dir holds at most after a group's save at "
                                   "the time limit, every group's saves together: the group saves its slots furthest "
                                   "along first, as many as fit beside the others; the rest start over (0: all). A "
                                   "device call returns at most 64 MiB: ~11 MAD slots of ~5.3 MB")
_TIME_LIMIT = flags.DEFINE_float("time_limit", 0, "seconds after which to stop (0: none)")
_DRAIN = flags.DEFINE_float("drain_seconds", 0, "start no queued job in the last this many seconds before "
                            "--time_limit, so fewer jobs are in flight to save or start over")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 1 << 20, "tokens per population step at most (slots × 32 × L)")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 256, "population size at most")
_STEPS_PER_CALL = flags.DEFINE_integer("steps_per_call", 200, "training steps per jitted call at most (calls end "
                                      "at every epoch end of a job in flight too, where it is evaluated)")
_MEMORY_FRACTION = flags.DEFINE_float("memory_fraction", 0.9, "share of the device memory left after the datasets "
                                      "that a population's compiled train step may use; larger populations are "
                                      "halved until it fits (a device that reports no limit, e.g. CPU: of the "
                                      "host memory available)")
_COMPACT = flags.DEFINE_integer("compact_min_steps", 1000, "shrink a population once nothing is queued and its jobs "
                                "in flight fit a smaller power of two of slots, if the longest has this many steps "
                                "left (mesanet_jax/mad/grid.py: compacted_size); -1: never")
_LONGEST_FIRST = flags.DEFINE_bool("longest_first", False, "train each architecture's groups costliest first (for "
                                   "several processes sharing the groups, one per GPU), not cheapest first")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "activation dtype (params stay f32; "
                           "bfloat16: mad-lab's Lightning precision 'bf16')")
_RESIDUAL_DTYPE = flags.DEFINE_enum("residual_dtype", "float32", ["", "float32", "bfloat16"], "the residual "
                                    "stream's dtype ('': --dtype's): float32 with --dtype=bfloat16 is PyTorch "
                                    "autocast's mixed precision, as mad-lab trains (the blocks' sums in f32, their "
                                    "sublayers in bf16)")
_IMPL = flags.DEFINE_string("impl", "", "Mesa implementation: xla | pallas ('': mesanet_jax/mad/models.py "
                            "FAST_MESA's for the backend)")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "Mesa / GDN chunk size (0: FAST_MESA's for Mesa, 64 for GDN)")
_PRECISION = flags.DEFINE_string("matmul_precision", "", "Mesa matmuls: highest | high (GPU Pallas: three unscaled "
                                 "bf16 passes) | default ('': FAST_MESA's)")
_GDN_IMPL = flags.DEFINE_enum("gdn_impl", "", ["", "xla", "pallas"], "Gated DeltaNet's operator: xla (chunked) | "
                              "pallas (recurrent kernels) ('': mesanet_jax/mad/models.py FAST_GDN's for the backend)")
_HAWK_IMPL = flags.DEFINE_enum("hawk_impl", "", ["", "xla", "pallas"], "Hawk's recurrence: xla (associative scan) | "
                               "pallas (linear scan kernels) ('': mesanet_jax/mad/models.py FAST_HAWK's for the "
                               "backend)")
_ATTENTION = flags.DEFINE_enum("attention_kernel", "", ["", "auto", "xla", "pallas"], "the Transformer's attention: "
                               "auto (cuDNN for bf16 on GPU, else XLA) | xla | pallas (jax's Pallas flash attention) "
                               "('': mesanet_jax/mad/models.py FAST_ATTENTION's for the backend)")
_CG_STEPS = flags.DEFINE_integer("cg_steps", 0, "Mesa CG steps in training (0: the head size, 16, which gives "
                                 "the paper's 30 steps' result to f32 rounding; mesanet_jax/mad/models.py: "
                                 "exact_cg_steps)")
_CG_TOL = flags.DEFINE_float("cg_tol", None, "Mesa's CG tolerance in training: each system stops once ‖r‖ ≤ "
                              "cg_tol·‖r₀‖, at most --cg_steps (unset: every solve runs --cg_steps, the paper's fixed "
                              "steps; write such runs to their own --results)")
_TIE_EMBEDDINGS = flags.DEFINE_bool("tie_embeddings", True, "the language models' read-out tied to the input embedding "
                                     "(the paper's backbone); false: its own matrix, as mad-lab's (write such runs to "
                                     "their own --results)")
_EMBED_STD = flags.DEFINE_float("embed_std", None, "the embedding's initial std with no √d input scale (unset: "
                                "mad-lab's 0.02, which the paper's MAD runs follow; mesanet_jax/mad/models.py: "
                                "EMBED_STD); 0: the paper's LM embedding (1/√d, multiplied by √d on input)")
_LINEAR_INIT_VARIANCE = flags.DEFINE_float("linear_init_variance", None, "multiplies the linear layers' initial "
                                           "variance (unset: mad-lab's 1/3, that of PyTorch's nn.Linear default; "
                                           "mesanet_jax/mad/models.py: LINEAR_INIT_VARIANCE); 1: ours, N(0, 1/fan_in)")
_AUTOENCODER_LINEAR_STD = flags.DEFINE_float("autoencoder_linear_std", None, "compression's autoencoder: every "
                                             "linear kernel N(0, std²), as mad-lab's autoencoder initialises them "
                                             "(0.02: mesanet_jax/mad/models.py MADLAB_AUTOENCODER_LINEAR_STD); "
                                             "unset: as the language model's (--linear_init_variance)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the groups this run would train, in order (jobs left, the "
                              "population's slots and steps without early stopping, saved slots), and train nothing")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "<results dir>/compilation_cache"),
    "JAX's persistent compilation cache, so the next piece of a grid (a resumed population, a group of the same "
    "shapes) skips its compiles; default: $JAX_COMPILATION_CACHE_DIR if set, else beside --results; '' turns it off")
_USAGE = flags.DEFINE_string("usage", "<results dir>/usage.jsonl", "JSONL of each group run's device time "
                             "(mesanet_jax/mad/usage.py; mesanet-mad-table sums it); '' records none")
_DEVICE_SHARE = flags.DEFINE_integer("device_share", 1, "grids running side by side on this device (each records its "
                                     "wall time over this as device time)")
_SEED = flags.DEFINE_integer("seed", 0, "data and init seed (recorded, as are --epochs and --num_examples: runs of "
                            "another seed write to their own --results; mesanet-mad-table --replicates sets them side "
                            "by side)")
_WORKERS = flags.DEFINE_integer("workers", 0, "data-generation processes (0: cores − 1)")


def _floats(flag) -> tuple:
  try:
    return tuple(float(v) for v in flag.value)
  except ValueError:
    raise ValueError(f"--{flag.name} must be a comma-separated list of numbers, got {','.join(flag.value)!r}") from None


def main(argv):
  cli.start(argv)
  from mesanet_jax.mad import grid, models, training, variants
  with cli.one_line_errors("mesanet-mad-grid"):
    bad = [a for a in _ARCHITECTURES.value if a not in models.ARCHITECTURES]
    if bad:
      raise ValueError(f"--architectures: {bad[0]!r} is not one of {models.ARCHITECTURES}")
    chosen = [variants.variants(t) for t in (_TASKS.value or variants.TASKS)]
    chosen = [v for vs in chosen for v in vs if not _VARIANTS.value or v.name in _VARIANTS.value]
    if not chosen:
      raise ValueError(f"--variants {_VARIANTS.value} match no variant of the tasks {_TASKS.value}")
    if _NUM_EXAMPLES.value % 32 or _NUM_EXAMPLES.value < 0:
      raise ValueError(f"--num_examples must be a multiple of 32 (the batch), got {_NUM_EXAMPLES.value}")
    if _DEVICE_SHARE.value < 1:
      raise ValueError(f"--device_share must be ≥ 1, got {_DEVICE_SHARE.value}")
    if _DRAIN.value < 0:
      raise ValueError(f"--drain_seconds must be ≥ 0, got {_DRAIN.value}")
    if _CG_TOL.value is not None and not _CG_TOL.value > 0:
      raise ValueError(f"--cg_tol must be > 0 (unset: fixed --cg_steps), got {_CG_TOL.value}")
    if _AUTOENCODER_LINEAR_STD.value is not None and not _AUTOENCODER_LINEAR_STD.value > 0:
      raise ValueError(f"--autoencoder_linear_std must be > 0 (unset: the language model's init), got "
                       f"{_AUTOENCODER_LINEAR_STD.value}")
    if _STATE_BUDGET.value < 0:
      raise ValueError(f"--state_budget_mib must be ≥ 0 (0: every slot in flight), got {_STATE_BUDGET.value}")
    root = os.path.dirname(os.path.abspath(_RESULTS.value))
    os.makedirs(root, exist_ok=True)
    cli.use_compilation_cache(_COMPILATION_CACHE.value.replace("<results dir>", root))
    settings = grid.Settings(
        results=_RESULTS.value, protocol=dataclasses.replace(training.Protocol(), epochs=_EPOCHS.value,
                                                           decay_embedding=_DECAY_EMBEDDING.value),
        data_dir=_DATA_DIR.value or os.path.join(root, "data"),
        state_dir=_STATE_DIR.value or os.path.join(root, "state"), state_budget=int(_STATE_BUDGET.value * 2**20),
        max_tokens=_MAX_TOKENS.value,
        max_slots=_MAX_SLOTS.value, steps_per_call=_STEPS_PER_CALL.value,
        time_limit=_TIME_LIMIT.value, drain=_DRAIN.value, usage=_USAGE.value.replace("<results dir>", root),
        device_share=_DEVICE_SHARE.value, dtype=_DTYPE.value, residual_dtype=_RESIDUAL_DTYPE.value,
        impl=_IMPL.value, chunk_size=_CHUNK.value,
        matmul_precision=_PRECISION.value, cg_steps=_CG_STEPS.value, cg_tol=_CG_TOL.value, gdn_impl=_GDN_IMPL.value,
        hawk_impl=_HAWK_IMPL.value,
        attention_kernel=_ATTENTION.value,
        tie_embeddings=_TIE_EMBEDDINGS.value,
        embed_std=models.EMBED_STD if _EMBED_STD.value is None else _EMBED_STD.value or None,
        linear_init_variance=(models.LINEAR_INIT_VARIANCE if _LINEAR_INIT_VARIANCE.value is None
                              else _LINEAR_INIT_VARIANCE.value),
        autoencoder_linear_std=_AUTOENCODER_LINEAR_STD.value, seed=_SEED.value, num_examples=_NUM_EXAMPLES.value,
        workers=_WORKERS.value,
        memory_fraction=_MEMORY_FRACTION.value,
        compact_min_steps=None if _COMPACT.value < 0 else _COMPACT.value, longest_first=_LONGEST_FIRST.value)
    jobs = training.jobs(_ARCHITECTURES.value, chosen, _floats(_LRS), _floats(_WDS))
    if _DRY_RUN.value:
      rows = grid.plan(settings, jobs)
      print("| group | jobs left | longest job (steps) | slots | population steps (no early stop) | saved slots |\n"
            "|---|---|---|---|---|---|")
      for r in rows:
        print(f"| {r['group']} | {r['jobs']} | {r['longest']} | {r['slots']} | {r['population_steps']} | "
              f"{r['saved']} |")
      print(f"{sum(r['jobs'] for r in rows)} jobs left in {len(rows)} groups")
      for note in grid.held_back(settings, jobs):
        print(note)
      return
    finished = grid.run(settings, jobs, SIGTERM)
  print(f"finished {finished} jobs; results in {_RESULTS.value}")


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
