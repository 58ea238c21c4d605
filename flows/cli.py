"""The `profile-relay` command line (SPEC "Interface contract")."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from destinations.config import Config, ConfigError, inline_secrets, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stream customer profiles to HTTP endpoints.")
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="YAML config file")]


def _config(path: Path) -> Config:
    """Validate the config the same way for every command; exit 2 when it is invalid."""
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]invalid config[/] {exc.source}:", markup=True)
        for field, message in exc.problems:
            err.print(f"  {field}: {message}" if field else f"  {message}", markup=False)
        raise typer.Exit(2) from None


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@app.command()
def validate(config: ConfigOpt) -> None:
    """Check the config; exit 2 with each problem and its field path when invalid."""
    cfg = _config(config)
    import yaml

    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    for field in inline_secrets(raw):
        err.print(f"warning: {field} is written inline; prefer ${{ENV_VAR}} or a Prefect "
                  "Secret block reference", markup=False)
    out.print(f"{config}: valid ({len(cfg.segments)} segment(s), {len(cfg.destinations)} "
              f"destination(s), {len(cfg.dataflows)} dataflow(s); state {cfg.state_path})",
              markup=False)


@app.command()
def ingest(config: ConfigOpt,
           files: Annotated[list[str], typer.Argument(help="NDJSON files, - for stdin")]) -> None:
    """Merge NDJSON profile fragments into the store; exit 1 if any line was rejected."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from state.db import open_db
    from tasks.ingest import ingest_files

    cfg = _config(config)
    for path in files:
        if path != "-" and not Path(path).is_file():
            err.print(f"error: {path}: no such file", markup=False)
            raise typer.Exit(2)
    db = open_db(cfg.state_path)
    total = sum(Path(p).stat().st_size for p in files if p != "-")
    shown = 0

    def reject(rejection: object) -> None:
        nonlocal shown
        shown += 1
        if shown <= 200:
            err.print(f"rejected {rejection}", markup=False)
        elif shown == 201:
            err.print("... (further rejections counted, not shown)", markup=False)

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=err, transient=True,
                  disable=not sys.stderr.isatty() or total < 5_000_000) as bar:
        task_id = bar.add_task("ingest", total=total or None)
        result = ingest_files(db, files, frozenset(s.id for s in cfg.segments), on_reject=reject,
                              on_progress=lambda n: bar.advance(task_id, n))
    out.print(f"ingested {result.ingested}, rejected {result.rejected}", markup=False)
    raise typer.Exit(1 if result.rejected else 0)


@app.command()
def stream(config: ConfigOpt,
           dataflow: Annotated[str | None, typer.Option(help="only this dataflow")] = None,
           interval: Annotated[float, typer.Option(help="seconds between polls")] = 2.0,
           once: Annotated[bool, typer.Option("--once", help="one whole pass, then exit")] = False,
           run_seconds: Annotated[float, typer.Option(help="end the run after this long")] = 3600.0,
           ) -> None:
    """Run the stream flow: poll for changes, export and deliver."""
    cfg = _config(config)
    if dataflow is not None:
        _known_dataflow(cfg, dataflow)
    from flows.stream import stream_flow

    totals = _run(stream_flow(str(config.resolve()), dataflow, interval, once, run_seconds))
    out.print_json(data=totals)


def _known_dataflow(cfg: Config, name: str) -> None:
    try:
        cfg.dataflow(name)
    except KeyError as exc:
        err.print(f"error: {exc.args[0]}", markup=False)
        raise typer.Exit(2) from None


@app.command()
def backfill(config: ConfigOpt, dataflow: Annotated[str, typer.Option(help="dataflow name")],
             segment: Annotated[str | None, typer.Option(help="only this mapped segment")] = None,
             ) -> None:
    """Run the backfill flow for a dataflow (or one of its segments)."""
    cfg = _config(config)
    _known_dataflow(cfg, dataflow)
    if segment is not None and segment not in cfg.dataflow(dataflow).segments:
        err.print(f"error: segment {segment!r} is not mapped to {dataflow!r}", markup=False)
        raise typer.Exit(2)
    from flows.backfill import backfill_flow

    out.print_json(data=_run(backfill_flow(str(config.resolve()), dataflow, segment)))


@app.command()
def replay(config: ConfigOpt, dataflow: Annotated[str, typer.Option(help="dataflow name")]) -> None:
    """Replay the failed-request store of a dataflow."""
    cfg = _config(config)
    _known_dataflow(cfg, dataflow)
    from flows.replay import replay_flow

    out.print_json(data=_run(replay_flow(str(config.resolve()), dataflow)))


@app.command()
def status(config: ConfigOpt,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False) -> None:
    """Per dataflow: pending, delivered, failed, lag, latency p50/p95 (last hour)."""
    from rich.table import Table

    from state.db import open_db
    from state.stats import dataflow_stats

    cfg = _config(config)
    db = open_db(cfg.state_path)
    stats = [dataflow_stats(db, f.name) for f in cfg.dataflows]
    if as_json:
        out.print_json(data={"dataflows": [s.as_dict() for s in stats]})
        return
    table = Table(title="profile-relay status (deliveries and latency: last hour)")
    for col in ("dataflow", "lag", "pending", "retrying", "delivered", "failed", "p50 ms",
                "p95 ms", "last error"):
        table.add_column(col)
    for s in stats:
        table.add_row(s.dataflow + ("" if s.known else " (not started)"),
                      f"{s.lag_changes} / {s.lag_seconds:.1f}s", str(s.pending), str(s.retrying),
                      str(s.delivered), str(s.failed), str(s.latency_p50_ms or "-"),
                      str(s.latency_p95_ms or "-"), (s.last_error or "")[:60])
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
