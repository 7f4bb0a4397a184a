"""`python -m tokensettle.simulator`: the simulator without the rest of the CLI."""

import sys

from tokensettle.simulator.cli import build_parser, main

sys.exit(main(build_parser().parse_args()))
