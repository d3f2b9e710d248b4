"""`python -m benchmarks.bench` (from the repository root): see benchmarks/bench/__init__.py and `--help`."""

import sys

from .cli import main

sys.exit(main())
