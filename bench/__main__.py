"""`python -m bench`: the performance harness's command line (bench/cli.py)."""

from bench.cli import main

raise SystemExit(main())
