"""Prediction with trained networks."""
