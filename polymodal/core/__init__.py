"""The functional core: pure functions and layer specs over explicit parameter pytrees."""

from . import pytree, random
from .pytree import Params
from .spec import Spec

__all__ = ["pytree", "random", "Params", "Spec"]
