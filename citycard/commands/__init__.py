"""The operators' commands of the registry and the card lifecycle: each module has ``register(subparsers)``.

``citycard.cli`` calls ``cards.register`` with the sub-commands of ``citycard card`` and the others with
the top-level sub-commands. Shared options, opening the registry, errors and output: ``common``.
"""
