"""``python -m scaleot_fed_cli``: the ``scaleot-fed`` command."""

import sys

from .main import main

sys.exit(main())
