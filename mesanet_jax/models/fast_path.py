"""`MesaConfig.impl="auto"`: how Mesa computes on this backend (impl, chunk size, matmul precision, CG tolerance).

Per JAX backend (benchmarks/RESULTS.md):
- GPU: the Pallas kernels at C = 32, one-pass "default" products, CG stopping at ‖r‖ ≤ 1e-4·‖r₀‖ (at most the
  preset's steps). On a trained model's Mesa inputs, one H200: 2.53 / 7.76 ms forward / forward+backward against
  flash-linear-attention's 3.92 / 11.82 and the XLA path's ~35 / 72 ms; 500-step quality runs with these settings
  equal 30 fixed "highest" steps within the seed noise. On sm_90 `PallasOperator.solve` runs the Mosaic GPU (Hopper)
  solve, elsewhere every stage is a Triton kernel.
- TPU: the Pallas kernels (they lower for Mosaic TPU, `tests/pallas/test_lowering.py`) with the preset's chunk size,
  precision and fixed steps: never timed on a TPU, so nothing else is changed.
- CPU and anything else: the XLA path with the preset's chunk size, precision and steps (Pallas only interprets).
Sizes the kernels cannot take (`unsupported_reason`: powers of two >= 16) fall back to the CPU choice.

`resolve` turns "auto" into concrete values once; a MesaConfig whose impl is not "auto" is left alone, so naming an
impl keeps every other field as given. The trainer applies its explicit overrides after resolving (train/config.py).
"""
import dataclasses

import jax

from mesanet_jax.ops.operator import operator_class

AUTO = "auto"
# backend: the fields "auto" sets (the rest keep the preset's values).
FAST_PATHS = {
    "gpu": dict(impl="pallas", chunk_size=32, matmul_precision="default", cg_tol=1e-4),
    "tpu": dict(impl="pallas"),
}
FALLBACK = dict(impl="xla")


def backend_and_device() -> tuple[str, str]:
  """JAX's default backend ("cpu", "gpu", "tpu") and its first device's kind (e.g. "NVIDIA H200")."""
  return jax.default_backend(), jax.devices()[0].device_kind


def resolve_mesa(mesa, backend: str | None = None):
  """`mesa` (a MesaConfig) with impl="auto" replaced by the choice for `backend` (default: JAX's); other impls unchanged."""
  if mesa.impl != AUTO:
    return mesa
  choice = FAST_PATHS.get(backend or jax.default_backend(), FALLBACK)
  fast = dataclasses.replace(mesa, **choice)
  if fast.impl != "xla" and operator_class(fast.impl).unsupported_reason(fast.chunk_size, fast.head_dim,
                                                                         fast.head_dim):
    return dataclasses.replace(mesa, **FALLBACK)
  return fast


def resolve(config, backend: str | None = None):
  """An LMConfig with its Mesa options resolved (`resolve_mesa`)."""
  return dataclasses.replace(config, mesa=resolve_mesa(config.mesa, backend))


def describe(config) -> dict:
  """What a run records of its (resolved) Mesa path: backend, device kind, impl, chunk size, precision, CG tol and
  steps. For config.json, the first metrics line and the one line every entry point prints."""
  backend, device = backend_and_device()
  m = config.mesa
  return {"backend": backend, "device_kind": device, "mesa_impl": m.impl, "mesa_chunk_size": m.chunk_size,
          "mesa_matmul_precision": m.matmul_precision, "mesa_cg_tol": m.cg_tol, "mesa_cg_steps": m.cg_steps_train}


def summary_line(config) -> str:
  """One line naming the Mesa path `config` (resolved) runs."""
  d = describe(config)
  if "mesa" not in config.mixers:
    return f"Mesa path: none (no Mesa layers) on {d['backend']} ({d['device_kind']})"
  tol = "fixed steps" if d["mesa_cg_tol"] is None else f"cg_tol {d['mesa_cg_tol']:g}"
  return (f"Mesa path: impl={d['mesa_impl']} chunk_size={d['mesa_chunk_size']} "
          f"matmul_precision={d['mesa_matmul_precision']} {tol} (at most {d['mesa_cg_steps']} CG steps) on "
          f"{d['backend']} ({d['device_kind']})")
