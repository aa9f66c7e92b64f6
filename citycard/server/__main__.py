"""``python -m citycard.server ...`` is ``citycard serve ...`` (the tests and the demo start it this way)."""

import argparse
import sys

from citycard.commands import serve

parser = argparse.ArgumentParser(prog="python -m citycard.server")
commands = parser.add_subparsers(dest="command", required=True)
serve.register(commands)
arguments = parser.parse_args(["serve", *sys.argv[1:]])
sys.exit(arguments.handler(arguments))
