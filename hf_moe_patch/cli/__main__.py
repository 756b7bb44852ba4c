"""``python -m hf_moe_patch.cli``: the ``hf-moe-patch`` command."""

import sys

from . import main

sys.exit(main())
