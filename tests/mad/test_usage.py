"""The grid's device-time accounting: group runs recorded as JSONL lines, hours per architecture, and the jobs left
costed at the measured rates with the early stopping measured so far."""
import json

import pytest

from mesanet_jax.mad import training, usage, variants


def _run(architecture, length, device_seconds, member_steps, jobs_finished=0):
  return {"architecture": architecture, "length": length, "device_seconds": device_seconds,
          "member_tokens": member_steps * length, "jobs_finished": jobs_finished, "device": "H100"}


def test_record_appends_a_line_per_group_run_with_its_share_of_the_device(tmp_path):
  path = str(tmp_path / "runs" / "usage.jsonl")
  assert usage.read(path) == []
  usage.record(path, group="gdn.lm.L128", architecture="gdn", length=128, seconds=200.0, member_steps=1000,
               jobs_finished=3, slots=10, device_share=2)
  usage.record(path, group="gdn.lm.L256", architecture="gdn", length=256, seconds=50.0, member_steps=10,
               jobs_finished=0, slots=4)
  first, second = usage.read(path)
  assert first["device_seconds"] == 100.0 and first["member_tokens"] == 128_000 and first["device"] == "cpu"
  assert second["device_seconds"] == 50.0 and second["member_tokens"] == 2560
  assert usage.summary([first, second])["gdn"]["device_hours"] == pytest.approx(150 / 3600)


def test_projection_scales_the_jobs_left_by_measured_early_stopping_and_costs_them_per_member_token():
  rows = [_run("gdn", 128, 3600.0, 1_000_000, jobs_finished=4), _run("mesanet", 128, 1800.0, 250_000)]
  records = [{"architecture": "gdn", "task": "in_context_recall", "steps": 100, "total_steps": 1000},
             {"architecture": "gdn", "task": "memorize", "steps": 900, "total_steps": 1000},
             {"architecture": "transformer", "task": "memorize", "steps": 500, "total_steps": 1000}]
  recall = variants.find("in_context_recall", "baseline")  # L 128, 12,800 examples: 80,000 steps
  memorize = variants.find("memorize", "baseline")
  jobs = [training.Job("gdn", recall, 1e-3, 0.1), training.Job("mesanet", recall, 1e-3, 0.1),
          training.Job("mesanet", memorize, 1e-3, 0.1), training.Job("hawk", recall, 1e-3, 0.1)]
  protocol = training.Protocol()
  ahead = usage.projection(rows, records, jobs, protocol)
  steps = lambda job: job.steps(protocol) * job.variant.seq_len
  # gdn: its own in-context recall share (0.1) at 1 hour per 128e6 member-tokens.
  assert ahead["gdn"]["device_hours"] == pytest.approx(0.1 * steps(jobs[0]) / 128e6)
  # mesanet: no finished job of its own, so the task's share over all architectures (memorize: 1400 / 2000), and
  # every step of recall (no finished recall job but gdn's, whose share is the task's: 0.1).
  mesanet_tokens = 0.1 * steps(jobs[1]) + 0.7 * steps(jobs[2])
  assert ahead["mesanet"]["member_tokens"] == pytest.approx(mesanet_tokens)
  assert ahead["mesanet"]["device_hours"] == pytest.approx(mesanet_tokens * 0.5 / 32e6)
  assert ahead["hawk"] == {"jobs_left": 1, "member_tokens": pytest.approx(0.1 * steps(jobs[3])), "device_hours": None}


def test_the_table_command_prints_the_hours_so_far_and_for_the_jobs_left(tmp_path):
  from tests import cli_runs
  results, usage_path = tmp_path / "results.jsonl", str(tmp_path / "usage.jsonl")
  record = {"architecture": "gdn", "task": "in_context_recall", "variant": "baseline", "lr": 1e-3,
            "weight_decay": 0.1, "accuracy": 1.0, "accuracy_micro": 1.0, "steps": 8000, "total_steps": 80000}
  results.write_text(json.dumps(record) + "\n")
  usage.record(usage_path, group="gdn.lm.L128", architecture="gdn", length=128, seconds=36.0, member_steps=8000,
               jobs_finished=1, slots=1)
  other = tmp_path / "ab" / "results.jsonl"  # the same job with mad-lab's embedding decay
  other.parent.mkdir()
  other.write_text(json.dumps({**record, "accuracy": 0.5, "decay_embedding": True}) + "\n")
  seed1 = tmp_path / "seed1.jsonl"  # the same job under another seed
  seed1.write_text(json.dumps({**record, "accuracy": 0.5, "seed": 1}) + "\n")
  (tmp_path / "empty.jsonl").write_text("")
  run, final, compared, replicated, not_a_replicate, same_seed, empty = cli_runs.run([
      ("experiments.mad_table", [f"--results={results}", f"--out={tmp_path}"], 1),
      ("experiments.mad_table", [f"--results={results}", "--metric=final_accuracy"], 1),
      ("experiments.mad_table", [f"--results={results}", f"--out={tmp_path}", f"--compare={other}"], 1),
      ("experiments.mad_table", [f"--results={results}", f"--out={tmp_path}", f"--replicates={seed1}"], 1),
      ("experiments.mad_table", [f"--results={results}", f"--out={tmp_path}", f"--replicates={seed1},{other}"], 1),
      ("experiments.mad_table", [f"--results={results}", f"--out={tmp_path}", f"--replicates={results}"], 1),
      ("experiments.mad_table", [f"--results={results}", f"--out={tmp_path}",
                                 f"--replicates={tmp_path / 'empty.jsonl'}"], 1)])
  assert run.returncode == 0, run.stderr[-2000:]
  # A record without "selection" kept its last evaluation, and one without dtypes ran the f32 model of its time.
  assert "(evaluation: final; activations float32, residual stream float32)" in run.stdout
  assert final.returncode == 2 and "--metric=final_accuracy: 1 of the 1 records" in final.stderr
  gdn = next(line for line in run.stdout.splitlines() if line.startswith("| gdn | 0.01 |"))
  assert "| 1 | cpu | 527 |" in gdn  # 528 GDN jobs, one done
  assert "| mesanet | 0 | 0 | | 528 | no run recorded |" in run.stdout
  assert compared.returncode == 0, compared.stderr[-2000:]
  assert "settings that differ: gdn: decay_embedding false here, true there" in compared.stdout
  row = "| gdn | in_context_recall | baseline | 1 | 100.0 (0.001, 0.1) | 50.0 (0.001, 0.1) | -50.0 | 100.0 | 50.0 |"
  assert row in compared.stdout
  assert replicated.returncode == 0, replicated.stderr[-2000:]
  assert "| gdn | in_context_recall | baseline | 1 | 100.0 (0.001, 0.1), 50.0 (0.001, 0.1) | 75.0 ± 35.4 | 100.0, " \
         "50.0 |" in replicated.stdout
  assert not_a_replicate.returncode == 2 and f"--replicates: {other} ran gdn with decay_embedding true, --results " \
         "with false: replicates differ in their seed alone" in not_a_replicate.stderr
  assert same_seed.returncode == 2 and f"--replicates: {results} holds seed 0, as an earlier file does" in \
         same_seed.stderr
  assert empty.returncode == 2 and "empty.jsonl holds no finished jobs" in empty.stderr
