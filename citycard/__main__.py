import sys

from citycard.cli import main

sys.exit(main())
