"""The library's version, on its own so that every module (and the build) can read it without importing ivpt."""
__version__ = "0.1.0"
