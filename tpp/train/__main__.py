"""``python -m tpp.train`` (what ``torchrun ... -m tpp.train`` runs): the ``tpp train`` command."""
import sys

from .run import main

sys.exit(main(prog="python -m tpp.train"))
