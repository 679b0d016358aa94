"""Finite-width networks trained in exactly the DMFT parameterisation (THEORY section 1)."""

from .train import Run as Run
from .train import ensemble as ensemble
from .train import ensemble_bytes as ensemble_bytes
from .train import forward as forward
from .train import init_params as init_params
from .train import train as train
