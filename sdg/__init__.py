"""Synthetic data generation from an InstructLab taxonomy: `python -m sdg validate|generate|mix`."""
