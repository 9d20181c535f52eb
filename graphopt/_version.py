"""graphopt's version, in a module of its own so the compiler can record it in every
manifest without importing the package facade (``graphopt/__init__.py``) above it."""

__version__ = "0.1.0"
