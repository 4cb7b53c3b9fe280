"""`python -m dgrun`: the same as the `dgrun` command."""

from dgrun.cli import main

raise SystemExit(main())
