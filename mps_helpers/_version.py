"""The package version, in a module of its own so that packaging reads it without importing."""

__all__ = ["__version__"]

__version__ = "0.1.0"
