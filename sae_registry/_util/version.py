"""The package's version, recorded on every run and shipped model."""

__version__ = "0.1.0"
