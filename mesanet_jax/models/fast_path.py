"""`MesaConfig.impl="auto"`: how Mesa computes on this backend (impl, chunk size, matmul precision, CG tolerance,
whether the backward keeps the forward's chunk states).

Per JAX backend (benchmarks/RESULTS.md):
- GPU: the Pallas kernels with one-pass "default" products, CG stopping at ‖r‖ ≤ 1e-4·‖r₀‖ (at most the preset's
  steps), and the forward's chunk states kept for the backward (`mesa_chunked`'s save_states: 4·B·H·(T/C+1)·Dk·(Dk+Dv)
  bytes per Mesa layer, e.g. 2.6 GiB more peak memory for the small preset at 8 × 2048 tokens and C = 64). The chunk
  size is the kernels' measured fastest (`PallasOperator.fastest_chunk_size`): 64 on sm_90 with Dk, Dv ∈ {64, 128}
  (the Hopper solve and token gradients), else 32. On one H200 at B=8 T=2048 H=16 D=128: 2.77 / 6.37 ms forward /
  forward+backward (C = 64) against flash-linear-attention's 3.78 / 11.77 and the XLA path's ~35 / 72 ms. 500-step
  quality runs with these settings equal 30 fixed "highest" steps within the seed noise.
- TPU: the Pallas kernels (they lower for Mosaic TPU, `tests/pallas/test_lowering.py`) with the preset's chunk size,
  precision and fixed steps: never timed on a TPU, so nothing else is changed.
- CPU and anything else: the XLA path with the preset's chunk size, precision and steps (Pallas only interprets).
Sizes the kernels cannot take (`unsupported_reason`: powers of two >= 16) fall back to the CPU choice.

`resolve_mesa` turns "auto" into concrete values once; a MesaConfig whose impl is not "auto" is left alone, so naming an
impl keeps every other field as given. The trainer applies its explicit overrides after resolving (train/config.py).
"""
import dataclasses

import jax

from mesanet_jax.ops.operator import operator_class

AUTO = "auto"
# backend: the fields "auto" sets (the rest keep the preset's values).
FAST_PATHS = {
    "gpu": dict(impl="pallas", matmul_precision="default", cg_tol=1e-4, save_states=True),
    "tpu": dict(impl="pallas"),
}
FALLBACK = dict(impl="xla")


def backend_and_device() -> tuple[str, str]:
  """JAX's default backend ("cpu", "gpu", "tpu") and its first device's kind (e.g. "NVIDIA H200")."""
  return jax.default_backend(), jax.devices()[0].device_kind


def resolve_mesa(mesa, backend: str | None = None, device_kind: str | None = None):
  """`mesa` (a MesaConfig) with impl="auto" replaced by the choice for `backend` and `device_kind` (default: JAX's
  and its first device's); other impls unchanged."""
  if mesa.impl != AUTO:
    return mesa
  default_backend, default_kind = backend_and_device()
  backend, device_kind = backend or default_backend, device_kind or default_kind
  fast = dataclasses.replace(mesa, **FAST_PATHS.get(backend, FALLBACK))
  if fast.impl == "xla":
    return fast
  operator = operator_class(fast.impl)
  chunk_size = operator.fastest_chunk_size(backend, device_kind, fast.head_dim, fast.head_dim, fast.matmul_precision)
  fast = dataclasses.replace(fast, chunk_size=chunk_size or fast.chunk_size)
  if operator.unsupported_reason(fast.chunk_size, fast.head_dim, fast.head_dim):
    return dataclasses.replace(mesa, **FALLBACK)
  return fast


def describe(config) -> dict:
  """What a run records of its (resolved) Mesa path: backend, device kind, impl, chunk size, precision, CG tol and
  steps, whether the backward keeps the chunk states. For config.json, the first metrics line and the one line every
  entry point prints."""
  backend, device = backend_and_device()
  m = config.mesa
  return {"backend": backend, "device_kind": device, "mesa_impl": m.impl, "mesa_chunk_size": m.chunk_size,
          "mesa_matmul_precision": m.matmul_precision, "mesa_solve_precision": m.solve_precision,
          "mesa_cg_tol": m.cg_tol, "mesa_cg_steps": m.cg_steps_train,
          "mesa_cg_preconditioner": m.cg_preconditioner, "mesa_save_states": m.save_states}


def summary_line(config) -> str:
  """One line naming the Mesa path `config` (resolved) runs."""
  d = describe(config)
  if "mesa" not in config.mixers:
    return f"Mesa path: none (no Mesa layers) on {d['backend']} ({d['device_kind']})"
  tol = "fixed steps" if d["mesa_cg_tol"] is None else f"cg_tol {d['mesa_cg_tol']:g}"
  if d["mesa_solve_precision"] is not None:
    tol += f", solves at {d['mesa_solve_precision']} refined once"
  if d["mesa_cg_preconditioner"] != "none":
    tol += f", {d['mesa_cg_preconditioner']}-preconditioned"
  return (f"Mesa path: impl={d['mesa_impl']} chunk_size={d['mesa_chunk_size']} "
          f"matmul_precision={d['mesa_matmul_precision']} {tol} (at most {d['mesa_cg_steps']} CG steps) on "
          f"{d['backend']} ({d['device_kind']}){', chunk states saved' if d['mesa_save_states'] else ''}")
