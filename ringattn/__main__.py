"""python -m ringattn: the ring demo (see ringattn/_demo.py and --help)."""

import sys

from ._demo import main

sys.exit(main())
