"""The ``shoal`` daemon: CLI, configuration, lifecycle and local API."""

__version__ = "0.1.0"
