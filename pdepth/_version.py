"""The package version, in a module of its own so that every module can import it downward."""

__version__ = "0.1.0"
