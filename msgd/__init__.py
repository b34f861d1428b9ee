"""msgd: one set of Python application modules behind every protocol."""

__version__ = "0.1.0"
