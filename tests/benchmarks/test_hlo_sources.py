"""A profile's kernels traced back to source lines: the compiled HLO's instructions by kernel name, each fusion with
the ops fused into it and where they were written; the trace's `hlo_op` arguments for kernels not named after one
(`gpu_profile.read_trace` of an XSpace written as a device's profile would be)."""
import inspect

import jax
import jax.numpy as jnp

from benchmarks import gpu_profile, hlo_sources


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


def _event(metadata_id: int, offset_us: float, duration_us: float, hlo_op: str = "") -> str:
  stats = f' stats {{ metadata_id: 1 str_value: "{hlo_op}" }}' if hlo_op else ""
  return (f"events {{ metadata_id: {metadata_id} offset_ps: {int(offset_us * 1e6)} "
          f"duration_ps: {int(duration_us * 1e6)}{stats} }}")


def test_the_trace_gives_each_device_kernels_time_launches_and_hlo_ops(tmp_path):
  kernels = [_event(1, 0, 300, "custom-call.3"), _event(1, 400, 100, "custom-call.4"), _event(2, 600, 200)]
  space = f"""
    planes {{ id: 1 name: "/device:GPU:0"
      lines {{ id: 7 name: "Stream #7(Kernel)" {" ".join(kernels)} }}
      lines {{ id: 8 name: "XLA Ops" {_event(2, 600, 200)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "sm90_gemm" }} }}
      event_metadata {{ key: 2 value {{ id: 2 name: "fusion_2" }} }}
      stat_metadata {{ key: 1 value {{ id: 1 name: "hlo_op" }} }} }}
    planes {{ id: 2 name: "/host:CPU" lines {{ id: 1 name: "python" {_event(1, 0, 5000)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "PjitFunction" }} }} }}"""
  profile = tmp_path / "plugins" / "profile" / "run"
  profile.mkdir(parents=True)
  (profile / "host.xplane.pb").write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(space))
  times, hlo_ops = gpu_profile.read_trace(str(tmp_path))
  # the device's stream only: not its derived "XLA Ops" line, not the host
  assert times == {"sm90_gemm": (2, 400e-6), "fusion_2": (1, 200e-6)}
  assert hlo_ops == {"sm90_gemm": ("custom-call.3", "custom-call.4"), "fusion_2": ()}
  profiled = gpu_profile.KernelTimes(1e-3, times, hlo_ops)
  assert profiled.busiest(1) == [("sm90_gemm", 2, 400e-6)] and profiled.launches == 3


def test_a_profiled_call_leaves_its_trace_in_the_directory_given(tmp_path):
  fn = jax.jit(jnp.sin)
  fn(jnp.ones(8)).block_until_ready()
  profiled = gpu_profile.kernel_times(fn, jnp.ones(8), trace_dir=str(tmp_path))
  assert profiled.wall_s > 0 and list(tmp_path.glob("**/*.xplane.pb"))
  assert gpu_profile.read_trace(str(tmp_path))[0] == profiled.kernels  # on a CPU: no device plane, no kernels
