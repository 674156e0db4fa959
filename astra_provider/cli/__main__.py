"""``python -m astra_provider.cli``: the ``astra`` command."""

import sys

from astra_provider.cli import main

sys.exit(main())
