import sys

from hatchling.cli import main

sys.exit(main())
