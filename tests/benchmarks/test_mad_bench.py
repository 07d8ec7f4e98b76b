"""benchmarks/mad_bench.py's estimate: rows measured with --autoencoder cost compression's groups, and only them."""
from benchmarks import mad_bench
from mesanet_jax.mad import grid


def _row(length: int, ms: float, readout: str | None = None) -> dict:
  row = {"arch": "gdn", "length": length, "slots": 10, "gdn_impl": "pallas", "dtype": "float32",
         "ms_per_member_step": ms}
  return {**row, "readout": readout} if readout else row


def _hours(rows: list[dict]) -> float:
  [(_, hours, _)] = mad_bench.estimate(rows, grid.Settings(results="", max_slots=10))
  return hours


def test_autoencoder_rows_cost_the_compression_groups_alone():
  lm = [_row(128, 1.0), _row(32, 0.25)]  # linear in L: any length costs the same from either row
  lm_only = _hours(lm)
  # The LM's rate is what compression costs without autoencoder rows.
  assert _hours([*lm, _row(32, 0.25, "autoencoder")]) == lm_only
  free_compression = _hours([*lm, _row(32, 0.0, "autoencoder")])
  compression = lm_only - free_compression
  assert 0 < compression < lm_only
  # Costs are linear in the autoencoder's rate, and the LM groups' (memorize's L 32 among them) do not move with it.
  assert abs(_hours([*lm, _row(32, 0.75, "autoencoder")]) - (free_compression + 3 * compression)) < 1e-9 * lm_only


def test_autoencoder_rows_alone_estimate_nothing():
  assert mad_bench.estimate([_row(32, 0.25, "autoencoder")], grid.Settings(results="", max_slots=10)) == []
