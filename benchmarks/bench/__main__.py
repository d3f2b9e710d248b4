"""`python -m ei2.bench`: see ei2/bench/__init__.py and `--help`."""

import sys

from .cli import main

sys.exit(main())
