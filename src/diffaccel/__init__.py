"""diffaccel: cheaper diffusion sampling without retraining, with the quality cost measured."""

__version__ = "0.1.0"
