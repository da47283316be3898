"""``python -m laudnet_ops.predictor``: see :mod:`laudnet_ops.predictor.cli`."""

import sys

from .cli import main

sys.exit(main())
