"""`calibserve calibrate`: fitting a checkpoint's calibration.json, every method on its own data.

- `command`: the `calibrate` typer command (the console script registers it).
- `multiple_choice`: the option-letter method fitted on a checkpoint's multiple-choice items.
- `label_free`: the same method with no labels (`--label-free --reference BASE`, DACA).
- `serve_fit`: the free-form methods and `no_letter` through the real serving path, end to end
  (`serve_and_fit`, `calibrate_with_serving`, `fit_written_model` for `merge --free-form`).
  Its steps, one module each:
  - `passes`: questions sent through calibserve's own app over one engine, replies as served;
  - `raw`: a reply's raw confidence by one method, served or recomputed and checked;
  - `methods`: which free-form methods are fitted; `verdict`: verify's yes/no tokens;
  - `method_fit`: one method's calibrator, thresholds and fit metrics on its graded replies;
  - `free_form`: every free-form method fitted, and the one served as `free_form`;
  - `no_letter`: the map for multiple-choice replies that name no option letter;
  - `document`: the fits written into the calibration document.
- `errors`: `ServeFitError`.

Above `server` in the layer contract (it drives calibserve's own app in-process, so what is
fitted is what is served) and beside `merge`, which it uses (the evaluator, the option-letter
fit) and which never imports it: `calibserve merge --free-form` gets the serving-path fit from
the console script (`merge.cli.merge_command(after_write)`). Nothing here is imported by this
package's `__init__`: the console script imports `command` without loading torch.
"""
