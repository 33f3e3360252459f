"""Dataset fingerprint and nnU-Net-style experiment plans."""

from medpipe.planning.fingerprint import fingerprint_dataset, read_fingerprint, write_fingerprint
from medpipe.planning.plans import plan_experiment, write_plans

__all__ = [
    "fingerprint_dataset",
    "plan_experiment",
    "read_fingerprint",
    "write_fingerprint",
    "write_plans",
]
