import sys

from citycard.apps.bus import TransitPlugin
from citycard.apps.plugin import main

sys.exit(main(TransitPlugin()))
