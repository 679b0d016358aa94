"""Finite-width networks trained in exactly the DMFT parameterisation (THEORY section 1)."""

from .train import Run as Run, forward as forward, init_params as init_params, train as train
