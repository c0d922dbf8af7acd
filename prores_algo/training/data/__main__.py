"""`python -m prores_algo.training.data`: the `prores-data` CLI."""

import sys

from prores_algo.training.data.cli import main

sys.exit(main())
