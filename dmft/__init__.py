"""dmft: dynamical mean-field theory of feature learning in wide neural networks.

Bordelon & Pehlevan, "Self-Consistent Dynamical Field Theory of Kernel Evolution in Wide Neural
Networks", NeurIPS 2022 (arXiv:2205.09653). Conventions: THEORY.md, summarised in the README.
"""

__version__ = "0.1.0"

from . import activations as activations
from . import datasets as datasets
from . import networks as networks
from .problem import MLP as MLP, Dataset as Dataset, Problem as Problem
from .solution import RESULTS as RESULTS, Solution as Solution
from .solve import AbstractSolver as AbstractSolver, solve as solve
from .samples import FieldSamples as FieldSamples, field_samples as field_samples
from .solvers import Lazy as Lazy, LinearClosure as LinearClosure, MonteCarlo as MonteCarlo
from .solvers import Perturbative as Perturbative, StaticNTK as StaticNTK


from . import io as io
from .compare import Comparison as Comparison, compare as compare
