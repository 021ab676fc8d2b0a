"""`python -m benchmarks.reliability`: run every reliability script (see run_all.py)."""

from benchmarks.reliability.run_all import main

raise SystemExit(main())
