"""Exports a trained run: `mesanet-export` or `python -m experiments.export`.

    mesanet-export --workdir=runs/fla --out=exports/fla                    # params + HF (the default: both)
    mesanet-export --workdir=runs/default --out=exports/default --format=params

params: `<out>/params/` (an orbax checkpoint of the params alone, no optimiser state) and `<out>/model_config.json`
(the LMConfig), read back by `mesanet_jax.eval.runs.load_params_export`. hf: `<out>/config.json` and
`<out>/model.safetensors` in flash-linear-attention's MesaNetForCausalLM layout (mesanet_jax/eval/hf_export.py);
configs fla cannot express are refused, naming the key (train with --config.model.fla_compatible=True).
"""

from absl import app, flags

from . import cli

_WORKDIR = flags.DEFINE_string("workdir", "", "the run to export (its config.json and checkpoints/)")
_STEP = flags.DEFINE_integer("step", -1, "checkpoint step (-1: the latest)")
_OUT = flags.DEFINE_string("out", "", "output directory")
_FORMAT = flags.DEFINE_multi_enum("format", ["params", "hf"], ["params", "hf"], "what to write (repeatable)")


def main(argv):
  cli.start(argv)
  from mesanet_jax.data import text
  from mesanet_jax.eval import hf_export, runs
  with cli.one_line_errors("mesanet-export"):
    if not _WORKDIR.value or not _OUT.value:
      raise ValueError("--workdir and --out are required")
    run = runs.load_run(_WORKDIR.value, None if _STEP.value < 0 else _STEP.value)
    if "hf" in _FORMAT.value:
      hf_export.check_expressible(run.lm)  # before anything is written
    if "params" in _FORMAT.value:
      runs.save_params_export(_OUT.value, run.lm, run.params)
      print(f"wrote {_OUT.value}/{runs.PARAMS}/ and {runs.MODEL_CONFIG} (step {run.step})")
    if "hf" in _FORMAT.value:
      data = run.config.data
      bos = 0 if data.source == "synthetic" else text.make_tokenizer(data.tokenizer).bos_id
      # Documents are BOS-separated, so BOS also ends one: it serves as EOS.
      hf_export.write_hf(_OUT.value, run.lm, run.params, bos_token_id=bos, eos_token_id=bos,
                         max_position_embeddings=data.seq_len)
      print(f"wrote {_OUT.value}/{hf_export.CONFIG_FILE} and {hf_export.WEIGHTS_FILE} (step {run.step}; load with "
            f"`import fla; transformers.AutoModelForCausalLM.from_pretrained({_OUT.value!r})`)")


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
