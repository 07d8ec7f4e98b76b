"""benchmarks/mad_grid_piece.sh, the device calls' MAD driver: a piece starts from the given results and saved slots,
stops at its time limit with the slots in flight saved under $OUT, and the next piece on the same machine continues
from where the first stopped (its jobs are not trained again); each records its device time in usage.jsonl.
benchmarks/mad_plan.sh runs several pieces in a set order within one call's time."""
import json
import os
import subprocess
import sys

import pytest

from mesanet_jax.mad import grid, training
from tests.cli_runs import ROOT
from tests.environment import subprocess_env


def _piece(tmp_path, out: str, limit: int, script: str = "benchmarks/mad_grid_piece.sh",
           **env) -> subprocess.CompletedProcess:
  env = subprocess_env(1, **{
      "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "OUT": str(tmp_path / out),
      "PIECE": str(tmp_path / "piece"), "RESULTS_IN": str(tmp_path / "tracked.jsonl"),
      "USAGE_IN": str(tmp_path / "no_usage.jsonl"), "STATE_IN": str(tmp_path / "no_state"), "ARCHS": "transformer",
      "TASKS": "in_context_recall", "LIMIT": str(limit),
      "EXTRA": f"--variants=baseline --num_examples=64 --epochs=2 --workers=1 --data_dir={tmp_path / 'data'} "
               "--steps_per_call=1", **env})
  return subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _collect(files_at, checkout) -> subprocess.CompletedProcess:
  env = {**os.environ, "TRACKED": str(checkout), "STATE": str(checkout / "madstate")}
  return subprocess.run(["bash", "benchmarks/mad_collect.sh", str(files_at), str(checkout / "logs" / "call.log")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _returned(tmp_path, name: str, results: str, last_line: str, parts=()):
  """What a device call hands back from a piece: results, usage, grid.log (ending in its state line), and the state
  parts packed as mad_grid_piece.sh packs them (state/state.tar.*)."""
  files_at = tmp_path / name
  (files_at / "state").mkdir(parents=True)
  (files_at / "results.jsonl").write_text(results)
  (files_at / "usage.jsonl").write_text('{"group": "gdn.lm.L128"}\n')
  (files_at / "grid.log").write_text(f"[ 0 s] 8 jobs to train\n{last_line}\n")
  if parts:
    saved = tmp_path / f"{name}_saved"
    saved.mkdir()
    for part in parts:
      (saved / part).write_bytes(os.urandom(3000))
    subprocess.run(f"tar -C {saved} -cf - {' '.join(parts)} | split -b 2K -d -a 2 - {files_at}/state/state.tar.",
                   shell=True, check=True)
  return files_at


def test_collect_brings_results_and_saved_slots_in_and_refuses_other_results(tmp_path):
  checkout = tmp_path / "checkout"
  checkout.mkdir()
  (checkout / "results.jsonl").write_text('{"job": 1}\n')
  parts = ["gdn.lm.L256.7.0-of-2.pkl", "gdn.lm.L256.7.1-of-2.pkl"]
  call = _returned(tmp_path, "call1", '{"job": 1}\n{"job": 2}\n', "state returned: " + " ".join(parts), parts)
  done = _collect(call, checkout)
  assert done.returncode == 0 and "2 records (1 new)" in done.stdout, done.stdout + done.stderr
  assert (checkout / "results.jsonl").read_text() == '{"job": 1}\n{"job": 2}\n'
  assert (checkout / "usage.jsonl").exists() and (checkout / "logs" / "call.log").exists()
  assert sorted(os.listdir(checkout / "madstate")) == parts
  assert (checkout / "madstate" / parts[1]).read_bytes() == (tmp_path / "call1_saved" / parts[1]).read_bytes()
  assert (checkout / "results_state.txt").read_text().split() == parts
  # A call that kept its slots on the machine (RETURN_STATE=0) leaves the saved slots and their list alone.
  kept = _returned(tmp_path, "call2", '{"job": 1}\n{"job": 2}\n{"job": 3}\n',
                   "state kept on the machine in /tmp/piece/state")
  assert _collect(kept, checkout).returncode == 0
  assert sorted(os.listdir(checkout / "madstate")) == parts
  assert len((checkout / "results.jsonl").read_text().splitlines()) == 3
  # Results that did not grow from the tracked ones (an A/B in its own file) are refused and change nothing.
  other = _returned(tmp_path, "call3", '{"job": 9}\n', "state returned: none")
  refused = _collect(other, checkout)
  assert refused.returncode == 2 and "is not the start of" in refused.stderr, refused.stderr
  assert len((checkout / "results.jsonl").read_text().splitlines()) == 3 and os.listdir(checkout / "madstate")
  # A part named in grid.log but not in the archive, or an archive missing a piece (a call returns at most 8 files),
  # is refused too.
  listed = "state returned: " + " ".join(parts)
  short = _returned(tmp_path, "call4", (checkout / "results.jsonl").read_text(), listed, parts[:1])
  refused = _collect(short, checkout)
  assert refused.returncode == 2 and "did not come back" in refused.stderr, refused.stderr
  cut = _returned(tmp_path, "call6", (checkout / "results.jsonl").read_text(), listed, parts)
  pieces = sorted(os.listdir(cut / "state"))
  assert len(pieces) > 1  # tar's 10 KiB record in pieces of 2 KiB
  os.remove(cut / "state" / pieces[1])  # the end of the first part, the start of the second
  refused = _collect(cut, checkout)
  assert refused.returncode == 2 and "a piece of it did not come back" in refused.stderr, refused.stderr
  # Everything finished: no slots saved, none listed.
  finished = _returned(tmp_path, "call5", (checkout / "results.jsonl").read_text(), "state returned: none")
  assert _collect(finished, checkout).returncode == 0
  assert os.listdir(checkout / "madstate") == [] and (checkout / "results_state.txt").read_text() == ""


def test_a_piece_stops_before_training_on_a_machine_without_the_saved_slots_its_results_list(tmp_path):
  (tmp_path / "tracked.jsonl").write_text("")
  (tmp_path / "tracked_state.txt").write_text("gdn.lm.L256.7.0-of-1.pkl\n")  # beside RESULTS_IN (_piece)
  refused = _piece(tmp_path, "refused", limit=600)
  assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
  assert "gdn.lm.L256.7.0-of-1.pkl" in refused.stderr and 'carry [".madstate"]' in refused.stderr
  assert "carry" in (tmp_path / "refused" / "grid.log").read_text()  # what the call hands back says why
  # A plan stops at the refused piece rather than trying the next ones.
  plan = _piece(tmp_path, "plan", limit=0, script="benchmarks/mad_plan.sh", END="600",
                PLAN="transformer:in_context_recall::4 transformer:memorize::4")
  log = (tmp_path / "plan" / "grid.log").read_text()
  assert plan.returncode == 2 and "plan stopped: piece 1 refused" in log and "=== piece 2" not in log, log


@pytest.mark.slow  # grid processes
def test_a_failed_grid_process_fails_its_piece_and_plan_after_they_hand_back_what_there_is(tmp_path):
  # Every job of the selection (_piece: the Transformer's in-context recall baseline) is done.
  # The settings of _piece's runs (2 epochs on 64 examples), as their records hold them.
  protocol = grid.protocol_settings(grid.Settings(results="", protocol=training.Protocol(epochs=2), num_examples=64))
  done = "".join(json.dumps({"architecture": "transformer", "task": "in_context_recall", "variant": "baseline",
                             "lr": lr, "weight_decay": wd, "accuracy": 1.0, **protocol}) + "\n"
                 for lr in (3e-3, 1e-3, 5e-4, 1e-4) for wd in (0.01, 0.1))
  (tmp_path / "tracked.jsonl").write_text(done)
  # One side-by-side process fails (an unknown architecture), the other has nothing to train and exits 0.
  failed = _piece(tmp_path, "failed", limit=600, ARCHS="transformer,nonexistent", SIDE_BY_SIDE="1")
  assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
  assert "a grid process exited non-zero" in failed.stderr
  log = (tmp_path / "failed" / "grid.log").read_text()
  assert "'nonexistent' is not one of" in log and "0 jobs to train" in log, log
  assert log.count("rc=0") == 1 and "state returned: none" in log, log
  assert (tmp_path / "failed" / "results.jsonl").read_text() == done
  # A plan notes the failed piece, goes on to the next and exits 1.
  plan = _piece(tmp_path, "plan", limit=0, script="benchmarks/mad_plan.sh", END="600",
                PLAN="nonexistent:in_context_recall::4 alsonot:memorize::4")
  log = (tmp_path / "plan" / "grid.log").read_text()
  assert plan.returncode == 1, plan.stdout[-2000:] + plan.stderr[-2000:]
  assert "=== piece 1 failed (rc 1)" in log and "=== piece 2 failed (rc 1)" in log and "plan done" in log, log


@pytest.mark.slow  # two grid processes
def test_pieces_save_at_the_time_limit_and_chain_on_one_machine(tmp_path):
  (tmp_path / "tracked.jsonl").write_text("")
  first = _piece(tmp_path, "first", limit=1, SLOTS="4")  # stops after its first call: 4 of 8 jobs in flight
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  log = (tmp_path / "first" / "grid.log").read_text()
  assert "rc=0" in log and "of 4 jobs in flight 4 saved" in log, log[-2000:]
  packed = sorted(os.listdir(tmp_path / "first" / "state"))  # the parts packed, in pieces of 15 MiB
  assert packed == [f"state.tar.{i:02d}" for i in range(len(packed))] and packed
  # A device call returns at most 8 files: a piece leaves only these (and the state's parts) in $OUT.
  assert sorted(os.listdir(tmp_path / "first")) == ["grid.log", "results.jsonl", "state", "usage.jsonl"]
  second = _piece(tmp_path, "second", limit=600, SLOTS="4")
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  log = (tmp_path / "second" / "grid.log").read_text()
  assert "4 resumed" in log, log[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "second" / "results.jsonl").read_text().splitlines()]
  assert sorted((r["lr"], r["weight_decay"]) for r in rows) == sorted(
      (lr, wd) for lr in (3e-3, 1e-3, 5e-4, 1e-4) for wd in (0.01, 0.1))  # every job once, none trained twice
  # Each piece's group run recorded its device time, the second's line after the first's (carried through $PIECE).
  usage = [json.loads(line) for line in (tmp_path / "second" / "usage.jsonl").read_text().splitlines()]
  assert [u["group"] for u in usage] == ["transformer.lm.L128"] * 2, usage
  assert [u["jobs_finished"] for u in usage] == [0, 8] and usage[1]["member_steps"] > 0
  assert all(u["device_share"] == 1 and u["device_seconds"] == u["seconds"] > 0 for u in usage)
  # The first piece's output as mad_collect.sh brings it into a checkout: its saved slots listed beside the results.
  checkout = tmp_path / "checkout"
  checkout.mkdir()
  (checkout / "results.jsonl").write_text("")
  collected = _collect(tmp_path / "first", checkout)
  assert collected.returncode == 0, collected.stderr
  saved = sorted(os.listdir(checkout / "madstate"))
  assert saved and all(name.startswith("transformer.lm.L128.") and name.endswith(".pkl") for name in saved)
  assert (checkout / "results_state.txt").read_text().split() == saved


@pytest.mark.slow  # three grid processes
def test_a_later_call_brings_saved_slots_to_a_machine_once(tmp_path):
  # The saved slots of an earlier session reach a machine whose pieces started without them (an earlier call carried
  # no .madstate): the next piece resumes them, and a piece after it, given the same files again, adds none.
  (tmp_path / "tracked.jsonl").write_text("")
  first = _piece(tmp_path, "first", limit=1, SLOTS="4")
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  checkout = tmp_path / "checkout"  # the first call's slots collected into a checkout's .madstate, carried later
  checkout.mkdir()
  (checkout / "results.jsonl").write_text("")
  assert _collect(tmp_path / "first", checkout).returncode == 0
  carried = checkout / "madstate"
  saved = sorted(os.listdir(carried))
  assert saved
  # The machine's piece as it stands when the slots have never been there: no state of its own.
  for name in saved:
    os.remove(tmp_path / "piece" / "state" / name)
  second = _piece(tmp_path, "second", limit=600, SLOTS="4", STATE_IN=str(carried))
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert "4 resumed" in (tmp_path / "second" / "grid.log").read_text()
  assert sorted((tmp_path / "piece" / "state_taken").read_text().split()) == saved
  third = _piece(tmp_path, "third", limit=600, SLOTS="4", STATE_IN=str(carried))
  assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
  assert os.listdir(tmp_path / "piece" / "state") == []  # the finished jobs' slots were not brought back
  rows = [json.loads(line) for line in (tmp_path / "third" / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 8 and "0 jobs to train" in (tmp_path / "third" / "grid.log").read_text()


@pytest.mark.slow  # two grid processes
def test_a_plan_runs_its_pieces_in_order_and_skips_them_when_time_is_out(tmp_path):
  (tmp_path / "tracked.jsonl").write_text("")
  # The second piece names no variants: EXTRA's --variants=baseline (_piece) applies; the first's flag overrides it.
  # The first names its own DRAIN; the second takes the env's.
  plan = "transformer:in_context_recall:vocab_size=32:4:7 transformer:in_context_recall::4"
  late = _piece(tmp_path, "late", limit=0, script="benchmarks/mad_plan.sh", PLAN=plan, END="30")
  assert late.returncode == 0, late.stdout[-3000:] + late.stderr[-3000:]
  log = (tmp_path / "late" / "grid.log").read_text()
  assert log.count("skipped") == 2 and not (tmp_path / "late" / "results.jsonl").exists(), log
  run = _piece(tmp_path, "run", limit=0, script="benchmarks/mad_plan.sh", PLAN=plan, END="600", DRAIN="3")
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  log = (tmp_path / "run" / "grid.log").read_text()
  assert log.index("=== piece 1") < log.index("=== piece 2") and log.count("rc=0") == 2, log[-3000:]
  first, second = log.split("=== piece 2")
  assert " DRAIN=7 " in first and " DRAIN=3 " in second, log[-3000:]
  assert "plan done" in log
  rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
  assert [r["variant"] for r in rows] == ["vocab_size=32"] * 8 + ["baseline"] * 8, rows  # piece 1's, then 2's
  # A malformed entry anywhere stops the plan before its first piece.
  for entry in ("transformer::16", "transformer:::16:soon", "transformer:::16:7:x"):
    bad = _piece(tmp_path, "bad", limit=0, script="benchmarks/mad_plan.sh", PLAN=f"{plan} {entry}")
    assert bad.returncode == 2 and "ARCHS:TASKS:VARIANTS:SLOTS[:DRAIN]" in bad.stderr, (entry, bad.stderr)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # two grid processes at once
def test_gpus_run_one_process_per_gpu_and_each_group_trains_once(tmp_path):
  (tmp_path / "tracked.jsonl").write_text("")
  # Memorize and compression: two groups (transformer.lm.L32, transformer.autoencoder.L32) for two processes.
  both = _piece(tmp_path, "both", limit=600, SLOTS="8", GPUS="2", TASKS="memorize,compress")
  assert both.returncode == 0, both.stdout[-3000:] + both.stderr[-3000:]
  log = (tmp_path / "both" / "grid.log").read_text()
  assert "=== grid_gpu0.log" in log and "=== grid_gpu1.log" in log and log.count("rc=0") == 2, log[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "both" / "results.jsonl").read_text().splitlines()]
  keys = [(r["task"], r["lr"], r["weight_decay"]) for r in rows]
  assert len(keys) == len(set(keys)) == 16, keys  # every job once: no group trained by both processes
  usage = [json.loads(line) for line in (tmp_path / "both" / "usage.jsonl").read_text().splitlines()]
  assert sorted(u["group"] for u in usage) == ["transformer.autoencoder.L32", "transformer.lm.L32"], usage
  assert sorted(os.listdir(tmp_path / "both" / "state")) == []  # no claim travels
  for bad in ({"GPUS": "0"}, {"GPUS": "2", "SIDE_BY_SIDE": "1"}):
    refused = _piece(tmp_path, "refused", limit=600, **bad)
    assert refused.returncode == 2 and "GPUS must be a number ≥ 1" in refused.stderr, refused.stderr
