"""`python -m d2compiler ...` is `d2c ...` (what `torchrun -m d2compiler run RECIPE` starts in each process)."""

import sys

from d2compiler.cli import main

sys.exit(main())
