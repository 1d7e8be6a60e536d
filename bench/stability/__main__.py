"""``python -m bench.stability run|report ...``."""

import sys

from .cli import main

sys.exit(main())
