"""calibserve's top package: the console script, composing the CLIs that `demo`, `merge`, `fit`,
`server` and `tune` define (`calibserve.cli`), the demo's offline steps
(`calibserve.demo_pipeline`), and the leaf module `calibserve.publish` (build once under a lock,
publish atomically).

`cli` and `demo_pipeline` are the only modules of the top package that import several of
calibserve's packages (`calibserve.fit` is the one package that does: it sits above `server`);
the packages themselves keep to the one-way dependencies in docs/internals.md, importing nothing
of the top package but `publish`, which imports nothing of ours.
"""
