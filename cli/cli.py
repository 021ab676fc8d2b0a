"""The `calibserve` command: `demo build`, `demo`, `merge`, `calibrate`, `certify`, `serve`,
`tune`."""

from __future__ import annotations

from pathlib import Path

import typer

from calibserve.calibration.document import PROBES_FILE
from calibserve.certify import certify as certify_command
from calibserve.demo.cli import app as demo_app
from calibserve.fit.command import calibrate as calibrate_command
from calibserve.merge.cli import merge_command
from calibserve.server.cli import serve as serve_command
from calibserve.tune.cli import tune as tune_command

DEMO_PROBE_RATE = 60.0  # calibration probes per minute in `calibserve demo`

app = typer.Typer(
    name="calibserve",
    help="Serve language models whose confidence can be trusted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _fit_written_model(model_dir: Path, data_dir: Path) -> None:
    """`merge --free-form`: the serving-path fit (imported when used: it starts an engine)."""
    from calibserve.fit.serve_fit import fit_written_model

    fit_written_model(model_dir, data_dir)


app.command("merge", help="Sweep base-to-aligned interpolations, pick a Pareto point, write it.")(
    merge_command(_fit_written_model)
)
app.command("calibrate", help="Fit calibration.json for one checkpoint (an escalation tier).")(
    calibrate_command
)
app.command("certify", help="Certify the thresholds of an escalation route, tier by tier.")(
    certify_command
)
app.command("serve", help="Serve a model behind the calibrated OpenAI-compatible proxy.")(
    serve_command
)
app.command("tune", help="Fine-tune a checkpoint on chat or eval data (loss on replies only).")(
    tune_command
)


def demo(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Where the proxy listens."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port the proxy listens on."),
    seed: int = typer.Option(0, help="Seed of the demo world."),
) -> None:
    """Build the demo world, merge its base and aligned models, and serve the result."""
    if ctx.invoked_subcommand is not None:
        return
    from calibserve.demo import build_world
    from calibserve.demo_pipeline import calibrate_demo_expert, merge_demo, served_demo_model
    from calibserve.server.cli import serve_model

    world = build_world(seed=seed)
    out = merge_demo(world, progress=True)
    # The merge's calibration.json plus free-form methods fitted through the serving path.
    model = served_demo_model(world, out)
    expert_calibration = calibrate_demo_expert(world)
    # The engines' own output goes to their log files; the ready block says where to send a
    # request and points at the merge's report.
    serve_model(
        model,
        host=host,
        port=port,
        report=out / "report.html",
        served_model_name="calibserve-demo",
        escalate_to=[str(world / "expert")],
        escalate_calibration=[expert_calibration],  # escalated answers are calibrated too
        threshold="auto",
        # Probes make live ECE exist from the first minute; an older cached merge has no
        # probes.jsonl beside it, and the world's test split is the same held-out set.
        probe_rate=DEMO_PROBE_RATE,
        probe_data=None if (out / "model" / PROBES_FILE).is_file()
        else world / "data" / "test.jsonl",
    )


app.add_typer(
    demo_app,
    name="demo",
    callback=demo,
    invoke_without_command=True,
    no_args_is_help=False,
    help="The demo: build the synthetic world and its tiny models, merge them, serve the merge.",
)


def main() -> None:
    app()
