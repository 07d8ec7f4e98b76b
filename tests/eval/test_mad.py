"""The MAD table in the paper's protocol: mean over difficulty variants per (lr, wd), best over the grid, IC and noisy
recall merged into one column, Avg only when all five columns have a value."""
import pytest

from mesanet_jax.eval import mad


def _run(task, lr, wd, accuracy, architecture="mesanet"):
  return {"architecture": architecture, "task": task, "lr": lr, "weight_decay": wd, "accuracy": accuracy}


def test_best_mean_over_variants_and_merged_recall_column():
  runs = [_run("fuzzy_recall", 1e-3, 0.1, 0.9), _run("fuzzy_recall", 1e-3, 0.1, 0.1),  # mean 0.5 over 2 variants
          _run("fuzzy_recall", 3e-3, 0.1, 0.6),  # one variant, best mean
          _run("in_context_recall", 1e-3, 0.1, 1.0), _run("noisy_recall", 1e-3, 0.1, 0.8)]
  row = mad.table9(runs)["mesanet"]
  assert row["tasks"]["fuzzy_recall"] == {"accuracy": pytest.approx(60.0), "lr": 3e-3, "weight_decay": 0.1,
                                          "variants": 1}
  assert row["columns"][:2] == [pytest.approx(90.0), pytest.approx(60.0)] and row["columns"][2:] == [None] * 3
  assert row["avg"] is None

  full = runs + [_run(task, 1e-3, 0.01, 0.5) for task in ("memorize", "selective_copy", "compress")]
  assert mad.table9(full)["mesanet"]["avg"] == pytest.approx((90 + 60 + 50 * 3) / 5)
  assert "| mesanet (ours) | 90.0 | 60.0 | 50.0 | 50.0 | 50.0 | 60.0 |" in mad.markdown(mad.table9(full))
