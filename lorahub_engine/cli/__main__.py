"""`python -m lorahub_engine.cli`: the same as `lorahub-engine`."""

import sys

from lorahub_engine.cli import main

sys.exit(main())
