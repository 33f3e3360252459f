"""Registration: the classical SimpleITK baseline, losses and fields shared with the networks."""
