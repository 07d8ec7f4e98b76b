"""Generates from a trained run: `mesanet-generate` or `python -m experiments.generate`.

    mesanet-generate --workdir=runs/default --prompt="The government said" --max_new_tokens=200
    mesanet-generate --workdir=runs/default --prompt="The " --temperature=0.8 --top_k=40 --cg_tol=1e-4

The prompt is prefilled (chunked CG), then tokens are decoded one at a time (constant memory, one CG solve per token,
Mesa layer and head) and printed as they come, detokenised incrementally. At the end: the CG steps per decoded token
(mean over Mesa layers and heads): their mean, min and max, and the last 100. Memory does not grow with
--max_new_tokens. Synthetic-task runs take and print token ids (--prompt="3 17 5").
"""
import collections
import dataclasses
import sys

from absl import app, flags

from . import cli

_WORKDIR = flags.DEFINE_string("workdir", "", "the run (its config.json and checkpoints/)")
_STEP = flags.DEFINE_integer("step", -1, "checkpoint step (-1: the latest)")
_PROMPT = flags.DEFINE_string("prompt", "", "prompt text (token ids separated by spaces for synthetic tasks)")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 100, "tokens to generate")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_CG_STEPS = flags.DEFINE_integer("cg_steps", 0, "CG steps per decoded token (0: the run's mesa.cg_steps_decode)")
_CG_TOL = flags.DEFINE_float("cg_tol", None, "stop each head's CG once ‖r‖ ≤ tol·‖r₀‖ (unset: the run's "
                              "mesa.decode_tol, by default the paper's 1e-4; 0: fixed steps)")
_WARM_START = flags.DEFINE_bool("warm_start", False, "start each token's CG from the previous token's solution "
                                "(--cg_tol is then relative to ‖q‖)")
_IMPL = flags.DEFINE_enum("impl", "", ["", "xla", "pallas"], "Mesa implementation (pallas: the fused decode "
                          "kernel; '': the run's)")
_SHOWN_STEPS = 100  # CG steps of the last this many tokens are printed at the end


def _encode(tokenizer, prompt: str):
  if tokenizer is None:
    try:
      return [int(t) for t in prompt.split()]
    except ValueError:
      raise ValueError(f"--prompt {prompt!r}: a synthetic-task run takes token ids separated by spaces") from None
  return [tokenizer.bos_id, *tokenizer.encode(prompt)]


def main(argv):
  cli.start(argv)
  import jax
  import numpy as np
  from mesanet_jax.data import text
  from mesanet_jax.data.detokenize import Detokenizer
  from mesanet_jax.eval import runs
  from mesanet_jax.models import fast_path
  from mesanet_jax.models.generate import stream
  with cli.one_line_errors("mesanet-generate"):
    if not _WORKDIR.value or not _PROMPT.value:
      raise ValueError("--workdir and --prompt are required")
    run = runs.load_run(_WORKDIR.value, None if _STEP.value < 0 else _STEP.value)
    data = run.config.data
    tokenizer = None if data.source == "synthetic" else text.make_tokenizer(data.tokenizer)
    prompt = _encode(tokenizer, _PROMPT.value)
    if not prompt or max(prompt) >= run.lm.vocab_size or min(prompt) < 0:
      raise ValueError(f"--prompt {_PROMPT.value!r}: token ids must lie in [0, {run.lm.vocab_size})")
    tol = run.lm.mesa.decode_tol if _CG_TOL.value is None else (_CG_TOL.value or None)
    mesa = dataclasses.replace(run.lm.mesa, cg_steps_decode=_CG_STEPS.value or run.lm.mesa.cg_steps_decode,
                               decode_tol=tol, decode_warm_start=_WARM_START.value,
                               impl=_IMPL.value or run.lm.mesa.impl)
    lm = dataclasses.replace(run.lm, mesa=mesa)
    print(fast_path.summary_line(lm), file=sys.stderr)  # stdout carries the generated text only
    model = runs.model_from(lm, run.params)
    tokens = stream(model, np.asarray([prompt]), _MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                    top_k=_TOP_K.value or None, key=jax.random.key(_SEED.value))

  print(_PROMPT.value, end="", flush=True)
  detokenizer = None if tokenizer is None else Detokenizer(tokenizer, context=prompt)
  last_steps, count, total, least, most = collections.deque(maxlen=_SHOWN_STEPS), 0, 0.0, float("inf"), 0.0
  for token, steps in tokens:
    if steps is not None:
      step = float(steps[0])
      last_steps.append(step)
      count, total, least, most = count + 1, total + step, min(least, step), max(most, step)
    print(f" {int(token[0])}" if detokenizer is None else detokenizer.push(token[0]), end="", flush=True)
  print()
  if count:
    budget = f"tol {mesa.decode_tol:g}, at most {mesa.cg_steps_decode}" if mesa.decode_tol else f"{mesa.cg_steps_decode}"
    print(f"CG steps per decoded token (mean over Mesa layers and heads; budget {budget}): mean {total / count:.2f}, "
          f"min {least:.2f}, max {most:.2f}; the last {len(last_steps)}:\n" + " ".join(f"{s:.1f}" for s in last_steps))


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
