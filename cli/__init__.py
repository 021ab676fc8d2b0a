"""calibserve's top package: the console script, composing the CLIs that `demo`, `merge` and
`server` define (`calibserve.cli`), the demo's offline steps (`calibserve.demo_pipeline`), and the
leaf module `calibserve.publish` (build once under a lock, publish atomically).

`cli` and `demo_pipeline` are the only modules that import several of calibserve's packages; the
packages themselves keep to the one-way dependencies in docs/internals.md, importing nothing of
the top package but `publish`, which imports nothing of ours.
"""
