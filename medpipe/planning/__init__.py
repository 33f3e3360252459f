"""Dataset fingerprint and nnU-Net-style experiment plans."""

from medpipe.planning.fingerprint import fingerprint_dataset, read_fingerprint, write_fingerprint
from medpipe.planning.planner import plan_experiment
from medpipe.planning.plans import PlanConfiguration, Plans, read_plans, write_plans

__all__ = [
    "PlanConfiguration",
    "Plans",
    "fingerprint_dataset",
    "plan_experiment",
    "read_fingerprint",
    "read_plans",
    "write_fingerprint",
    "write_plans",
]
