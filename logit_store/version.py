"""The tool version a store records in its manifest (`tool.version`)."""

__version__ = "0.1.0"
