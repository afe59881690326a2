"""``python -m examwatch``: the command line."""

import sys

from examwatch.cli import main

sys.exit(main())
