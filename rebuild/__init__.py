"""rebuild: safe remote rebuilds for NixOS hosts."""

__version__ = "0.1.0"
