"""`python -m calibserve` is the `calibserve` console script."""

from calibserve.cli import main

main()
