"""A profile's kernels traced back to source lines: the compiled HLO's instructions by kernel name, each fusion with
the ops fused into it and where they were written; the trace's `hlo_op` arguments for kernels not named after one."""
import gzip
import inspect
import json

import jax
import jax.numpy as jnp

from benchmarks import hlo_sources, mad_bench


def _scaled_tanh_sum(x, w):
  hidden = jnp.tanh(x @ w)
  return hidden.sum(0) * 2.0


def test_each_instruction_is_found_by_its_kernel_name_with_the_lines_of_its_ops():
  compiled = jax.jit(_scaled_tanh_sum).lower(jnp.ones((8, 4)), jnp.ones((4, 4))).compile().as_text()
  table = hlo_sources.instructions(compiled)
  first = inspect.getsourcelines(_scaled_tanh_sum)[1]
  line = lambda offset: f"tests/benchmarks/test_hlo_sources.py:{first + offset} (_scaled_tanh_sum)"
  here = line(1)
  tanh_kernels = [name for name, entry in table.items() if f"tanh at {here}" in entry["sources"]]
  assert tanh_kernels, table  # the tanh, alone or fused, carries its line
  fused = [name for name in tanh_kernels if table[name]["opcode"] == "fusion"]
  for name in fused:  # a fusion lists every op it computes: here the sum and the scale of the next line too
    assert "." not in name and "-" not in name
    assert f"reduce_sum at {line(2)}" in table[name]["sources"]
  name = (fused or tanh_kernels)[0]
  described = hlo_sources.describe(name, (), table)
  assert described.startswith(f"{table[name]['instruction']} {table[name]['opcode']}") and "tanh at" in described
  assert hlo_sources.describe("cublas_gemm_kernel", (table[name]["instruction"],), table) == described  # via hlo_op
  assert hlo_sources.describe("unknown_kernel", (), table) == ""


def test_kernel_times_keep_each_kernels_hlo_op(tmp_path):
  profile = tmp_path / "plugins" / "profile" / "run"
  profile.mkdir(parents=True)
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
            {"ph": "X", "pid": 1, "tid": 7, "name": "sm90_gemm", "dur": 300.0, "args": {"hlo_op": "custom-call.3"}},
            {"ph": "X", "pid": 1, "tid": 7, "name": "sm90_gemm", "dur": 100.0, "args": {"hlo_op": "custom-call.4"}},
            {"ph": "X", "pid": 1, "tid": 7, "name": "fusion_2", "dur": 200.0, "args": {}}]
  with gzip.open(profile / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  times, hlo_ops, total = mad_bench.kernel_times(str(tmp_path), steps=2, top=1)
  assert times == {"sm90_gemm": 0.2} and total == 0.3  # ms per step, the busiest first; all kernels' total
  assert hlo_ops == {"sm90_gemm": ("custom-call.3", "custom-call.4")}
