"""Flax NNX layers: Mesa and baseline mixers, MLP, norms, short convolution, parameter helpers."""
