"""One solver per file."""

from .lazy import Lazy as Lazy
from .linear import LinearClosure as LinearClosure
from .monte_carlo import MonteCarlo as MonteCarlo
from .perturbative import Perturbative as Perturbative
