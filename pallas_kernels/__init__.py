"""Pallas kernels for MesaNet."""
