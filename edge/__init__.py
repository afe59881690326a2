"""The room agent: config, model, store, exporter, runtime and CLI."""

__version__ = "0.1.0"
