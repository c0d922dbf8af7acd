"""`python -m prores_algo.data`: the `prores-data` CLI."""

import sys

from prores_algo.data.cli import main

sys.exit(main())
