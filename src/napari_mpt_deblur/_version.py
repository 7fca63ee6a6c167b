"""The package version, in a module of its own.

Every layer may import it without importing the package root (which re-exports the
public API), and hatch reads it from here when building (``[tool.hatch.version]``).
"""

__version__ = "0.1.0"
