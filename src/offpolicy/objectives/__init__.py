"""Pure objective math: losses, advantages, corrections, KL, aggregation, diagnostics.

Nothing here holds state or does I/O. Each family is a flat ``Registry`` (a dict
whose failed lookups list the valid names) filled by decorators where each
function is defined; importing this package registers everything.
See docs/algorithms.md for the table of every registered name.
"""

from offpolicy.objectives.aggregate import AGGREGATIONS
from offpolicy.objectives.diagnostics import DIAGNOSTICS
from offpolicy.objectives.corrections import CORRECTIONS
from offpolicy.objectives.kl import KL_ESTIMATORS
from offpolicy.objectives.advantages import ADVANTAGES
from offpolicy.objectives.losses import POLICY_LOSSES

__all__ = ["POLICY_LOSSES", "ADVANTAGES", "CORRECTIONS", "AGGREGATIONS", "KL_ESTIMATORS", "DIAGNOSTICS"]
