"""`calibserve serve`: the short form (flags) and the full form (YAML) of the server's config.

The lead registers `serve` as `calibserve serve` (`app.command("serve")(server.cli.serve)`);
`app` here holds it alone for tests; `serve_model` is the Python entry point `calibserve demo`
uses after merging. Flags override or extend what `--config` says.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
import uvicorn

from calibserve.server.config import (
    DEFAULT_PORT,
    EngineSettings,
    ModelSettings,
    ServerSettings,
    TierSettings,
)
from calibserve.server.engine_log import engine_output

log = logging.getLogger("calibserve.server")
app = typer.Typer(help="calibserve server", add_completion=False, no_args_is_help=True)


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _dir_name(path: Path) -> str:
    path = path.expanduser().resolve()
    # `calibserve merge` writes OUT/model: the output directory names the model better.
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def _discover_name(url: str, api_key: str | None) -> str | None:
    """The model an upstream serves, when it serves exactly one (one try, 5 s)."""
    from calibserve.routing import (
        RetryPolicy,
        RoutingMetrics,
        Upstream,
        UpstreamError,
        discover_model,
    )

    async def ask() -> str | None:
        upstream = Upstream("discover", url, api_key=api_key, timeout=5.0,
                            retry=RetryPolicy(max_attempts=1), metrics=RoutingMetrics())
        try:
            return await discover_model(upstream)
        except UpstreamError:
            return None
        finally:
            await upstream.aclose()

    return asyncio.run(ask())


def _escalation_tier(target: str, index: int, api_key: str | None) -> TierSettings:
    if _is_url(target):
        host = urlsplit(target).hostname or "upstream"
        return TierSettings(name=f"escalate-{index}-{host}" if index else f"escalate-{host}",
                            upstreams=[target], api_key=api_key)
    path = Path(target)
    if not path.is_dir():
        raise typer.BadParameter(f"{target}: not a directory or http(s) URL",
                                 param_hint="--escalate-to")
    return TierSettings(name=_dir_name(path), model=path)


def _with_calibration(tiers: list[TierSettings], files: list[Path]) -> list[TierSettings]:
    """The i-th --escalate-calibration file is the i-th --escalate-to tier's calibration.json."""
    if len(files) > len(tiers):
        raise typer.BadParameter(f"{len(files)} calibration file(s) for {len(tiers)} "
                                 "--escalate-to tier(s)", param_hint="--escalate-calibration")
    for path in files:
        if not Path(path).is_file():
            raise typer.BadParameter(f"{path}: no such file", param_hint="--escalate-calibration")
    return [t.model_copy(update={"calibration": Path(files[i])}) if i < len(files) else t
            for i, t in enumerate(tiers)]


def settings_from_cli(
    *,
    model: Path | None = None,
    upstream: list[str] | None = None,
    config: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    served_model_name: str | None = None,
    escalate_to: list[str] | None = None,
    escalate_calibration: list[Path] | None = None,
    threshold: str | None = None,
    target_accuracy: float | None = None,
    max_error: float | None = None,
    policy: str | None = None,
    budget: float | None = None,
    stream_mode: str | None = None,
    on_uncalibrated: str | None = None,
    api_key: list[str] | None = None,
    feedback_key: list[str] | None = None,
    signing_key: str | None = None,
    upstream_api_key: str | None = None,
    max_model_len: int | None = None,
    engine_arg: list[str] | None = None,
    probe_rate: float | None = None,
    probe_data: Path | None = None,
    recalibrate: str | None = None,
    recalibration_dir: Path | None = None,
    header_timeout: float | None = None,
    body_timeout: float | None = None,
    keep_alive_timeout: float | None = None,
    write_timeout: float | None = None,
    max_connections: int | None = None,
) -> ServerSettings:
    """Flags -> ServerSettings (the same object a YAML config produces)."""
    if probe_rate is not None and not 0 <= probe_rate <= 6000:
        raise typer.BadParameter(f"{probe_rate}: must be between 0 and 6000 per minute",
                                 param_hint="--probe-rate")
    if probe_data is not None:
        _check_probe_data(probe_data)
    _check_connection_limits(header_timeout, body_timeout, keep_alive_timeout, write_timeout,
                             max_connections)
    if recalibrate is not None and recalibrate not in ("off", "shadow", "on"):
        raise typer.BadParameter(f"{recalibrate!r}: must be off, shadow or on",
                                 param_hint="--recalibrate")
    overrides: dict[str, Any] = {
        "host": host, "port": port, "signing_key": signing_key, "probe_rate": probe_rate,
        "recalibrate": recalibrate, "recalibration_dir": recalibration_dir,
        "api_keys": _split(api_key) or None, "feedback_keys": _split(feedback_key) or None,
        "header_timeout_s": header_timeout, "body_timeout_s": body_timeout,
        "keep_alive_timeout_s": keep_alive_timeout, "write_timeout_s": write_timeout,
        "max_connections": max_connections,
    }
    if config is not None:
        settings = ServerSettings.from_yaml(config, **overrides)
    else:
        settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    upstreams = _split(upstream)
    if model is not None and upstreams:
        raise typer.BadParameter("give --model DIR or --upstream URL, not both")
    if model is None and not upstreams:
        if not settings.models:
            raise typer.BadParameter("give --model DIR, --upstream URL or --config FILE")
        if probe_data is not None:
            raise typer.BadParameter("with --config alone, set probe_data per model in the "
                                     "file", param_hint="--probe-data")
        return settings
    engine = EngineSettings(max_model_len=max_model_len, extra_args=list(engine_arg or []))
    entry: dict[str, Any] = {"engine": engine, "policy": policy, "budget": budget,
                             "stream_mode": stream_mode, "target_accuracy": target_accuracy,
                             "threshold": threshold, "probe_data": probe_data,
                             "max_error": max_error}
    if on_uncalibrated is not None:
        entry["uncalibrated"] = on_uncalibrated
    if model is not None:
        if not model.is_dir():
            raise typer.BadParameter(f"{model}: not a directory", param_hint="--model")
        name = served_model_name or _dir_name(model)
        entry.update(name=name, model=model)
    else:
        discovered = served_model_name or _discover_name(upstreams[0], upstream_api_key)
        if not discovered:
            raise typer.BadParameter("cannot learn the model name from the upstream's /v1/models;"
                                     " give --served-model-name", param_hint="--upstream")
        name = discovered
        entry.update(name=name, upstreams=upstreams, api_key=upstream_api_key)
    entry["escalate_to"] = _with_calibration([
        _escalation_tier(t, i, upstream_api_key) for i, t in enumerate(_split(escalate_to))
    ], escalate_calibration or [])
    models = [m for m in settings.models if m.name != entry["name"]]
    models.insert(0, ModelSettings(**{k: v for k, v in entry.items() if v is not None}))
    return settings.model_copy(update={"models": models})


def _check_connection_limits(header: float | None, body: float | None, keep_alive: float | None,
                             write: float | None, max_connections: int | None) -> None:
    for hint, seconds in (("--header-timeout", header), ("--body-timeout", body),
                          ("--keep-alive-timeout", keep_alive), ("--write-timeout", write)):
        if seconds is not None and not seconds > 0:
            raise typer.BadParameter(f"{seconds}: must be more than 0 seconds", param_hint=hint)
    if max_connections is not None and max_connections < 1:
        raise typer.BadParameter(f"{max_connections}: must be at least 1",
                                 param_hint="--max-connections")


def _check_probe_data(path: Path) -> None:
    from calibserve.server.probes import ProbeDataError, ProbeSet

    try:
        ProbeSet.load(path)
    except ProbeDataError as exc:
        raise typer.BadParameter(str(exc), param_hint="--probe-data") from None


def run_server(settings: ServerSettings) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn drains in-flight requests, then engines stop."""
    from calibserve.server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    from calibserve.server.connections import (
        ConnectionGuard,
        ConnectionLimits,
        raise_open_file_limit,
    )

    raise_open_file_limit()  # before the cap is derived from it
    try:
        app = create_app(settings, settle=True)
    except ValueError as exc:  # settings the files cannot meet: a threshold calibration.json lacks
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    # httptools, one write per response, and the deadlines and cap of server/connections.py.
    guard = ConnectionGuard(ConnectionLimits.from_settings(settings), app.state.runtime.metrics)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port,
        log_level=settings.log_level, timeout_graceful_shutdown=int(settings.drain_timeout_s),
        access_log=False, http=guard.protocol(),
    )
    uvicorn.Server(config).run()


def serve_model(
    model_dir: Path | str,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    report: Path | None = None,
    **options: Any,
) -> None:
    """Serve one checkpoint with a managed engine (what `calibserve demo` calls after merging).

    `options` are `settings_from_cli` keywords (served_model_name, escalate_to, threshold, ...);
    `report`: a merge report (report.html) for the ready block to point at.
    """
    _run_announced(settings_from_cli(model=Path(model_dir), host=host, port=port, **options),
                   report)


def _run_announced(settings: ServerSettings, report: Path | None = None) -> None:
    """`run_server` with the console around its start (server/console.py): an engine that fails
    to start is one line, and once /ready answers, the ready block."""
    from calibserve.server.console import announce_when_ready, one_line_engine_errors

    one_line_engine_errors()
    announcer = announce_when_ready(settings, report)
    try:
        run_server(settings)
    finally:
        if announcer is not None:
            announcer.cancel()


def serve(
    model: Annotated[Path | None, typer.Option(
        "--model", help="checkpoint directory to serve with a managed vLLM engine")] = None,
    upstream: Annotated[list[str] | None, typer.Option(
        "--upstream", help="external vLLM/OpenAI base URL (repeatable or comma list: replicas)"
    )] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="YAML config (several models, tiers, keys); flags extend it")] = None,
    host: Annotated[str | None, typer.Option(help="listen address [default: 0.0.0.0]")] = None,
    port: Annotated[int | None, typer.Option(help=f"listen port [default: {DEFAULT_PORT}]")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="model name clients use (default: the checkpoint's directory name)")] = None,
    escalate_to: Annotated[list[str] | None, typer.Option(
        "--escalate-to", help="stronger model: checkpoint DIR (second managed engine) or URL; "
        "repeat for a route of 3+ tiers (every tier but the last judged by its own threshold; "
        "policy budget judges the primary only, never no tier)")
    ] = None,
    escalate_calibration: Annotated[list[Path] | None, typer.Option(
        "--escalate-calibration",
        help="calibration.json for the --escalate-to tier in the same position (default: "
        "DIR/calibration.json if present; made by `calibserve calibrate`, certified for a route "
        "by `calibserve certify`)")] = None,
    threshold: Annotated[str | None, typer.Option(
        help="escalate below this calibrated confidence, or 'auto' (from calibration.json), or "
        "'guaranteed' (the certified threshold for --max-error, from calibration.json); with "
        "3+ tiers each tier but the last by its own (auto/guaranteed: from its own "
        "--escalate-calibration)")
    ] = None,
    target_accuracy: Annotated[float | None, typer.Option(
        help="with --threshold auto: the accuracy target to take the threshold for")] = None,
    max_error: Annotated[float | None, typer.Option(
        "--max-error", help="with --threshold guaranteed: the certified error rate of kept "
        "answers (certified by `calibserve calibrate`, `merge` or, for a route, `certify` "
        "--max-error; the certificate for exactly it, else the strictest below it; default: "
        "the strictest certified; give it on a route of 3+ tiers)")] = None,
    policy: Annotated[str | None, typer.Option(help="never | threshold | budget")] = None,
    budget: Annotated[float | None, typer.Option(
        help="with --policy budget: target escalation rate")] = None,
    stream_mode: Annotated[str | None, typer.Option(help="buffer | prefix:N | off")] = None,
    on_uncalibrated: Annotated[str | None, typer.Option(
        "--on-uncalibrated",
        help="threshold policy on a confidence with no calibrator of its own: threshold "
        "(default: its method's threshold, else the free-form method's, else serve) | "
        "escalate | serve")] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", envvar="CALIBSERVE_API_KEY", help="bearer key(s) required on /v1/*")] = None,
    feedback_key: Annotated[list[str] | None, typer.Option(
        "--feedback-key", envvar="CALIBSERVE_FEEDBACK_KEY",
        help="bearer key(s) for /v1/feedback (default: the API keys)")] = None,
    signing_key: Annotated[str | None, typer.Option(
        envvar="CALIBSERVE_SIGNING_KEY", help="HMAC key for response ids (share across replicas)")
    ] = None,
    upstream_api_key: Annotated[str | None, typer.Option(
        envvar="CALIBSERVE_UPSTREAM_API_KEY", help="API key sent to --upstream/--escalate-to URLs")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="managed engine --max-model-len")] = None,
    engine_arg: Annotated[list[str] | None, typer.Option(
        "--engine-arg", help="extra vLLM argument (repeatable), e.g. --engine-arg=--enforce-eager")
    ] = None,
    engine_console: Annotated[bool, typer.Option(
        "--engine-console", help="relay the managed engines' own output (vLLM's) to this "
        "console too; by default each writes its log file, whose path is printed")] = False,
    engine_log_dir: Annotated[Path | None, typer.Option(
        "--engine-log-dir", help="directory of the managed engines' log files [default: this "
        "run's, $CALIBSERVE_HOME/runs/<UTC time>-<pid>]")] = None,
    probe_rate: Annotated[float | None, typer.Option(
        "--probe-rate", help="calibration probes per minute per model, sent through the serving "
        "path and graded by calibserve (source=\"probe\" counters) [default: 0, off]")] = None,
    probe_data: Annotated[Path | None, typer.Option(
        "--probe-data", help="probe items, eval JSONL [default: probes.jsonl next to "
        "calibration.json: the held-out split merge writes]")] = None,
    recalibrate: Annotated[str | None, typer.Option(
        "--recalibrate", help="online recalibration from probes and feedback: off | shadow "
        "(export the refitted candidate's ECE) | on (swap it in when better) [default: off]")
    ] = None,
    recalibration_dir: Annotated[Path | None, typer.Option(
        "--recalibration-dir", help="persist swapped calibrators here (a volume shared by "
        "replicas; a restart serves the latest)")] = None,
    header_timeout: Annotated[float | None, typer.Option(
        "--header-timeout", help="seconds for a request line and headers to arrive; else 408 "
        "and close [default: 10]")] = None,
    body_timeout: Annotated[float | None, typer.Option(
        "--body-timeout", help="most seconds between two reads of a request body; else 408 "
        "[default: 30]")] = None,
    keep_alive_timeout: Annotated[float | None, typer.Option(
        "--keep-alive-timeout", help="close a keep-alive connection idle this long "
        "[default: 15]")] = None,
    write_timeout: Annotated[float | None, typer.Option(
        "--write-timeout", help="most seconds a response write may wait on a client that stopped "
        "reading; then the connection is aborted [default: 30]")] = None,
    max_connections: Annotated[int | None, typer.Option(
        "--max-connections", help="open connections per process; more get a fast 503 "
        "[default: the open-file limit less 256, at most 10000]")] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Serve models with calibrated confidence behind an OpenAI-compatible API."""
    settings = settings_from_cli(
        model=model, upstream=upstream, config=config, host=host, port=port,
        served_model_name=served_model_name, escalate_to=escalate_to,
        escalate_calibration=escalate_calibration, threshold=threshold,
        target_accuracy=target_accuracy, max_error=max_error, policy=policy, budget=budget,
        stream_mode=stream_mode,
        on_uncalibrated=on_uncalibrated, api_key=api_key, feedback_key=feedback_key,
        signing_key=signing_key,
        upstream_api_key=upstream_api_key, max_model_len=max_model_len, engine_arg=engine_arg,
        probe_rate=probe_rate, probe_data=probe_data, recalibrate=recalibrate,
        recalibration_dir=recalibration_dir, header_timeout=header_timeout,
        body_timeout=body_timeout, keep_alive_timeout=keep_alive_timeout,
        write_timeout=write_timeout, max_connections=max_connections,
    )
    _check_calibrations(settings, "--config" if config is not None else "--model")
    _run_announced(engine_output(settings, engine_console, engine_log_dir).model_copy(
        update={"log_level": log_level}))


def _check_calibrations(settings: ServerSettings, hint: str) -> None:
    """Every tier's calibration.json loads, before anything starts: a bad one is a usage error
    naming the file, not a traceback from the app's start."""
    from calibserve.calibration import CalibrationError
    from calibserve.server.runtime import load_calibration

    for model in settings.models:
        for tier in [model, *model.escalate_to]:
            try:
                load_calibration(tier.calibration_path())
            except CalibrationError as exc:
                raise typer.BadParameter(str(exc), param_hint=hint) from None


app.command("serve")(serve)


@app.callback()
def _main() -> None:
    """calibserve server commands."""
