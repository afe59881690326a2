"""Collectors, one module per protocol. Importing this package registers every built-in collector."""

from collectors.base import REGISTRY, Accumulator, Collector, DeviceError, Health, PollingCollector, register

__all__ = ["REGISTRY", "Accumulator", "Collector", "DeviceError", "Health", "PollingCollector", "register", "load_all"]


def load_all() -> dict[str, type[Collector]]:
    """Import every collector module so each registers itself; returns the registry."""
    import importlib
    import pkgutil

    import collectors

    for mod in pkgutil.iter_modules(collectors.__path__):
        if mod.name not in ("base",) and not mod.name.startswith("_") and not mod.ispkg:
            importlib.import_module(f"collectors.{mod.name}")
    return REGISTRY
