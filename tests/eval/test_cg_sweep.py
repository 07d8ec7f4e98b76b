"""The CG sweep's paired ΔNLL against a reference budget (the measurement behind a default decode tolerance)."""
import jax
import numpy as np
import pytest
from flax import nnx

from mesanet_jax.eval import cg_sweep
from mesanet_jax.models.config import preset
from mesanet_jax.models.lm import LanguageModel


@pytest.mark.slow
def test_budgets_are_compared_with_the_reference_on_the_same_targets():
  lm = preset("tiny", "mesanet")  # Dk = 32
  params = nnx.state(LanguageModel(lm, rngs=nnx.Rngs(0)), nnx.Param)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 17), 0, lm.vocab_size))
  mask = np.ones((2, 16), np.float32)
  mask[1, :4] = 0
  batches = [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}]
  reference = cg_sweep.Budget(64)  # 2·Dk steps: converged, so what differs from it is the budget's doing
  budgets = [cg_sweep.Budget(1), cg_sweep.Budget(64, 1e-6, warm_start=True), cg_sweep.Budget(64, 1e-2)]
  rows = {row["budget"]: row for row in cg_sweep.sweep(lm, params, batches, budgets, reference)}
  assert list(rows) == ["steps=64", "steps=1", "tol=1e-06+warm", "tol=0.01"]  # the reference first
  same = rows["steps=64"]
  assert same["delta_loss"] == same["max_abs_delta"] == 0 and same["argmax_agreement"] == 1
  assert all(row["reference"] == "steps=64" for row in rows.values())
  # A converged warm start is the reference up to f32 rounding; one step from the Jacobi guess is far from it.
  warm, one = rows["tol=1e-06+warm"], rows["steps=1"]
  assert warm["max_abs_delta"] < 1e-4 and warm["argmax_agreement"] == 1 and warm["mean_cg_steps"] < 64
  assert one["max_abs_delta"] > 100 * warm["max_abs_delta"] and one["delta_loss_se"] > 0
  assert one["delta_loss"] == pytest.approx(one["loss"] - same["loss"], abs=1e-5)  # mean over the same 28 targets
