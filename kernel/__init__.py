"""The shared vocabulary, once: readings and alarm events, levels and kinds, the metric catalog, the wire
envelope, the strict-TOML config base and broker settings. Every other package imports it; it imports none."""
