"""`python -m collector` runs the collector command line."""

from collector.cli import main

raise SystemExit(main())
