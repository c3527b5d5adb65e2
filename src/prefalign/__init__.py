"""prefalign: align causal language models with preference data."""

__version__ = "0.1.0"
