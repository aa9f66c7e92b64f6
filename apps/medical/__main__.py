import sys

from citycard.apps.medical import MedicalPlugin
from citycard.apps.plugin import main

sys.exit(main(MedicalPlugin()))
