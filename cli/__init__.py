"""calibserve's console script: composes the CLIs that `demo`, `merge` and `server` define.

This is the only module that imports several of calibserve's packages; the packages themselves keep
to the one-way dependencies in docs/internals.md.
"""
