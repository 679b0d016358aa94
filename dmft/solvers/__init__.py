"""One solver per file."""

from .lazy import Lazy as Lazy
