"""One training engine for segmentation and registration."""
