"""The ``gateway`` command: serve, demo, verify, reindex.

Every option of ``serve`` is also a ``GATEWAY_*`` environment variable (see gateway.config).
Exit codes: 0 success, 1 a check failed (verify, demo), 2 bad usage or configuration.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.config import Settings, load_settings
from gateway.errors import ConfigurationError, GatewayError
from gateway.observability import configure_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Alliance gateway: FHIR and HL7 v2 in, encrypted to IPFS, anchored on the shared ledger.",
)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory [env GATEWAY_DATA_DIR]")
]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="TOML or JSON settings file")]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except (ConfigurationError, ValueError) as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    profile: Annotated[
        str | None, typer.Option("--profile", help="embedded or production [env GATEWAY_PROFILE]")
    ] = None,
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option("--host")] = None,
    http_port: Annotated[int | None, typer.Option("--http-port")] = None,
    mllp_port: Annotated[int | None, typer.Option("--mllp-port")] = None,
    config: ConfigFile = None,
) -> None:
    """Run the gateway: FHIR REST, ledger API and the MLLP listener."""
    import uvicorn

    from gateway.app import create_app

    settings = _settings(
        config,
        profile=profile,
        data_dir=data_dir,
        host=host,
        http_port=http_port,
        mllp_port=mllp_port,
    )
    configure_logging(settings.log_level)
    # The gateway keeps large, long-lived views in memory (the ledger index, the tree); with
    # Python's default thresholds the collector traverses them every few thousand allocations,
    # which cost about a fifth of the HL7 throughput (docs/benchmarks.md). Collect less often.
    gc.set_threshold(50_000, 20, 100)
    fastapi_app = create_app(settings)
    uvicorn.run(
        fastapi_app,
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def demo(
    data_dir: DataDir = None,
    keep: Annotated[bool, typer.Option(help="Keep the data directory afterwards")] = False,
) -> None:
    """Start an embedded gateway, post a sample Bundle, read it back, verify the ledger."""
    from gateway.demo import run_demo

    code = asyncio.run(run_demo(data_dir=data_dir, keep=keep))
    raise typer.Exit(code)


@app.command()
def verify(
    data_dir: DataDir = None,
    blobs: Annotated[bool, typer.Option("--blobs", help="Re-hash every stored ciphertext")] = False,
    from_checkpoint: Annotated[
        Path | None,
        typer.Option("--from-checkpoint", help="A checkpoint saved earlier; check consistency"),
    ] = None,
    profile: Annotated[str | None, typer.Option("--profile")] = None,
    config: ConfigFile = None,
) -> None:
    """Audit the ledger: re-derive every root, check every signature and link (and blobs)."""
    from gateway.verify_cmd import run_verify

    settings = _settings(config, profile=profile, data_dir=data_dir)
    configure_logging("WARNING")
    try:
        code = asyncio.run(run_verify(settings, blobs=blobs, from_checkpoint=from_checkpoint))
    except GatewayError as exc:
        typer.echo(f"verify: {exc}", err=True)
        code = 2
    raise typer.Exit(code)


@app.command()
def reindex(
    data_dir: DataDir = None,
    profile: Annotated[str | None, typer.Option("--profile")] = None,
    config: ConfigFile = None,
) -> None:
    """Rebuild the search index from the ledger and the blobs (this institution's records)."""
    from gateway.search.rebuild import run_reindex

    settings = _settings(config, profile=profile, data_dir=data_dir)
    configure_logging("WARNING")
    try:
        count = asyncio.run(run_reindex(settings, progress=True))
    except GatewayError as exc:
        typer.echo(f"reindex: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"reindexed {count} record versions")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
