"""examwatch: equipment monitoring for exam sites.

One installed namespace mapped onto the project's top-level folders (pyproject's package-dir):
``examwatch.kernel`` (kernel/), ``examwatch.rules``, ``examwatch.collectors``, ``examwatch.edge``,
``examwatch.gateway``, ``examwatch.simulators``; the command line (``examwatch.cli``) sits above them all.
"""

__version__ = "0.1.0"
