"""One solver per file."""

from .approximations import Perturbative as Perturbative
from .approximations import StaticNTK as StaticNTK
from .lazy import Lazy as Lazy
from .linear import LinearClosure as LinearClosure
from .monte_carlo import MonteCarlo as MonteCarlo
