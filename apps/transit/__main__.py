import sys

from citycard.apps.plugin import main
from citycard.apps.transit import TransitPlugin

sys.exit(main(TransitPlugin()))
