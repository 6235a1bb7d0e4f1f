"""Loss-landscape measures: along training (probe.py, Santurkar et al. 2018) and around a
checkpoint (surface.py, Li et al. 2018); plots.py draws them; `python -m vggbench.landscape`."""

from vggbench.landscape.probe import LANDSCAPE_FILE, MULTIPLIERS, LandscapeProbe, probe
from vggbench.landscape.surface import Grid, directions, evaluate_grid, filter_normalized_direction

__all__ = ["LANDSCAPE_FILE", "MULTIPLIERS", "Grid", "LandscapeProbe", "directions", "evaluate_grid",
           "filter_normalized_direction", "probe"]
