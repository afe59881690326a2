"""The room agent: config, model, store, exporter, runtime and CLI."""
