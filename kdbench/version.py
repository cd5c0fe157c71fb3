"""The kdbench version (a module of its own, so that reading it never imports the package's public API)."""

__version__ = "0.1.0"
