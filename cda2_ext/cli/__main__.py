"""``python -m cda2_ext.cli``: the same as the ``cda2`` command."""
import sys

from . import main

sys.exit(main())
