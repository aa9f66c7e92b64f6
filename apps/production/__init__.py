"""citycard.apps.production: card production and distribution, from the e-government roster to cards
activated in their holders' hands (README.md in this folder walks through it).

This application joins the back office (``citycard.core``: the registry) and the chip
(``citycard.card``: personalisation, PIN change), which never import each other.
"""

from .batches import BatchSummary, CreateResult, HeldBack, batch_summary, create_batches
from .chips import PersonalizeResult, card_profile, open_chip, personalize_batch
from .distribution import DistributionResult, activate, activate_financial, distribute_to_employer, hand_over
from .errors import ProductionError, RowProblem
from .parallel import default_jobs
from .photos import PhotoImportResult, PhotoProblem, convert_photo, import_photos, missing_photos
from .printed import PrintedResult, register_printed
from .printfile import PRINT_COLUMNS, PrintExport, export_print
from .review import ReviewResult, export_review, import_review
from .roster import ImportResult, import_roster
from .settings import INITIAL_PIN, PhotoSpec, ProductionSettings, load_production_settings
from .store import Batch, BatchRow, EntryState, ImportRecord, ProductionStore, RosterEntry, RowState

__all__ = [
    "INITIAL_PIN",
    "PRINT_COLUMNS",
    "Batch",
    "BatchRow",
    "BatchSummary",
    "CreateResult",
    "DistributionResult",
    "EntryState",
    "HeldBack",
    "ImportRecord",
    "ImportResult",
    "PersonalizeResult",
    "PhotoImportResult",
    "PhotoProblem",
    "PhotoSpec",
    "PrintExport",
    "PrintedResult",
    "ProductionError",
    "ProductionSettings",
    "ProductionStore",
    "ReviewResult",
    "RosterEntry",
    "RowProblem",
    "RowState",
    "activate",
    "activate_financial",
    "batch_summary",
    "card_profile",
    "convert_photo",
    "create_batches",
    "default_jobs",
    "distribute_to_employer",
    "export_print",
    "export_review",
    "hand_over",
    "import_photos",
    "import_review",
    "import_roster",
    "load_production_settings",
    "missing_photos",
    "open_chip",
    "personalize_batch",
    "register_printed",
]
