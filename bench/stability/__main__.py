"""``python -m bench.stability run|report ...``: ``smet-bench stability run|report ...``, the same command."""

import sys

from ..cli import console_main

console_main(["stability", *sys.argv[1:]])
