"""citycard.core: the settlement core (ledger), the registry and the card lifecycle."""
