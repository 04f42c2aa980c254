"""`python -m sazd`: the `sazd` command line."""

from sazd.cli import main

raise SystemExit(main())
