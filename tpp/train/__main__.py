"""``python -m tpp.train`` (what ``torchrun ... -m tpp.train`` runs): the ``tpp train`` command.

Under torchrun the process leaves with ``os._exit`` once its output is flushed: after a clean
``destroy_process_group`` the C++ statics of c10d/gloo can still abort the interpreter's teardown ("terminate called
without an active exception", seen in about 1 of 20 two-rank gloo runs on torch 2.14), which torchrun would report
as a failed rank although every result was written.
"""
import logging
import os
import sys

from .run import main

code = main(prog="python -m tpp.train")
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
