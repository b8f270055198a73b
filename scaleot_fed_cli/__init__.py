"""The ``scaleot-fed`` command: on top of the library (``scaleot_fed``) and the programs
(``recipes``, ``simulations``), which never import it."""

from .main import main

__all__ = ["main"]
