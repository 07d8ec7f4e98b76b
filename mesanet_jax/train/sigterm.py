"""A SIGTERM flag for preemption: the trainer saves at the next step boundary, waits for the write and exits 0.

Imports nothing heavy, so `mesanet-train` installs it before JAX is imported: a SIGTERM during setup (imports,
data, compilation) is noticed too, and the run exits 0 before its first step with nothing half-written.
"""
import signal


class SigtermFlag:
  """Sets `.raised` on SIGTERM instead of dying; `restore()` puts the previous handler back."""

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.raised = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)
