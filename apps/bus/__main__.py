import sys

from citycard.apps.plugin import main
from citycard.apps.bus import TransitPlugin

sys.exit(main(TransitPlugin()))
