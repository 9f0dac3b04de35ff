"""``python -m tpp``: the ``tpp`` command (see :mod:`tpp.cli`)."""
import sys

from .cli import main

sys.exit(main())
