"""Evaluation of trained models on held-out cases, on the raw data's own grid."""
