"""deploycraft: skip-connection CNNs from a trained model to a verified production artifact."""

__version__ = "0.1.0"
