"""`calibserve calibrate`: fitting a checkpoint's calibration.json, every method on its own data.

- `command`: the `calibrate` typer command (the console script registers it).
- `multiple_choice`: the option-letter method fitted on a checkpoint's multiple-choice items.
- `label_free`: the same method with no labels (`--label-free --reference BASE`, DACA).
- `serve_fit`: the free-form methods and `no_letter`, fitted through the real serving path.

Above `server` in the layer contract (it drives calibserve's own app in-process, so what is
fitted is what is served) and beside `merge`, which it uses (the evaluator, the option-letter
fit) and which never imports it: `calibserve merge --free-form` gets the serving-path fit from
the console script (`merge.cli.merge_command(after_write)`).
"""
