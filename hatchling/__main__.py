import sys

from hatchling.cli import entry

sys.exit(entry())
