"""dmft: dynamical mean-field theory of feature learning in wide neural networks.

Bordelon & Pehlevan, "Self-Consistent Dynamical Field Theory of Kernel Evolution in Wide Neural
Networks", NeurIPS 2022 (arXiv:2205.09653). Conventions: THEORY.md, summarised in the README.
"""

__version__ = "0.2.0"

from . import activations as activations
from . import costs as costs
from . import datasets as datasets
from . import io as io
from . import losses as losses
from . import networks as networks
from .compare import Comparison as Comparison
from .compare import compare as compare
from .costs import Estimate as Estimate
from .costs import estimate as estimate
from .fluctuations import Fluctuations as Fluctuations
from .fluctuations import fluctuations as fluctuations
from .problem import MLP as MLP
from .problem import Dataset as Dataset
from .problem import Problem as Problem
from .samples import FieldSamples as FieldSamples
from .samples import field_samples as field_samples
from .solution import RESULTS as RESULTS
from .solution import Solution as Solution
from .solve import AbstractSolver as AbstractSolver
from .solve import solve as solve
from .solvers import Lazy as Lazy
from .solvers import LinearClosure as LinearClosure
from .solvers import MonteCarlo as MonteCarlo
from .solvers import Perturbative as Perturbative
