"""`python -m collector` runs the collector command line."""

from collector.cli import main

if __name__ == "__main__":  # not again in a decode worker (multiprocessing spawn)
    raise SystemExit(main())
