"""Samplers as part of a plan: the solver section's schema, our EVODiff scheduler, and the
schedulers a plan can ask for, built on the pipeline's own noise schedule."""

from diffaccel.solvers.spec import SOLVERS, SolverSpec

__all__ = ["SOLVERS", "SolverSpec"]
