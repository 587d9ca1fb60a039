"""`python -m pdserve`: the `pdserve` command."""

from pdserve.cli import main

raise SystemExit(main())
