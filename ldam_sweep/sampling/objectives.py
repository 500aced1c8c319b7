"""Re-export of the objective table (``ldam_sweep.objectives``), kept for existing imports."""

from ldam_sweep.objectives import check_objective, objective_for, unit_objective, units_objective  # noqa: F401
