"""`python -m d2compiler ...` is `d2c ...` (what `torchrun -m d2compiler run RECIPE` starts in each
process). A launched process binds its lifetime to the launcher's before importing anything heavy."""

import sys

from d2compiler.lifetime import die_with_launcher

die_with_launcher()

from d2compiler.cli import main  # noqa: E402  (after the lifetime is bound: this imports torch)

sys.exit(main())
