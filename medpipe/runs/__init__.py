"""Trained runs as artifacts: the folder layout (`folder`), the run description
(`spec`), checkpoints (`checkpoint`) and loading a trained network from them (`loading`).

Below training, evaluation and inference, which all read or write runs."""
