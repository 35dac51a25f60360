"""The ``gateway`` command: serve, demo, verify, reindex, dictionary (import-csv, remap),
clients add|list|disable|self, dev-token, erasure run.

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
    try:
        tls = https_options(settings)
        fastapi_app = create_app(settings)
    except ConfigurationError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        fastapi_app,
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        **tls,
    )


def https_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS options: HTTPS with this gateway's certificate, client certificates from
    the alliance CA asked for but optional (gateways present theirs; other callers use
    tokens), modern ciphers only. Without a certificate the HTTP port must be on loopback.

    Raises ConfigurationError for a plain port on another address or a certificate without
    its key.
    """
    import ssl

    from gateway.auth.tls import CIPHERS_TLS12, is_loopback

    if settings.tls_cert_file is None:
        if not is_loopback(settings.host):
            raise ConfigurationError(
                f"plain HTTP is allowed on loopback only; {settings.host} needs tls_cert_file"
            )
        return {}
    if settings.tls_key_file is None:
        raise ConfigurationError("tls_cert_file needs tls_key_file")
    options: dict[str, Any] = {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
        "ssl_ciphers": CIPHERS_TLS12,
    }
    if settings.tls_ca_file is not None:
        options.update(ssl_ca_certs=str(settings.tls_ca_file), ssl_cert_reqs=ssl.CERT_OPTIONAL)
    return options


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


dictionary_app = typer.Typer(
    no_args_is_help=True, help="The unified dictionary: convert curators' CSV maps, re-map."
)
app.add_typer(dictionary_app, name="dictionary")


@dictionary_app.command("import-csv")
def dictionary_import_csv(
    sources: Annotated[
        list[Path], typer.Argument(help="CSV maps (see mappings/dictionary_csv.py)")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Dictionary directory to write the JSON into")
    ] = Path("mappings/dictionary"),
    check: Annotated[
        bool,
        typer.Option("--check/--no-check", help="Load the resulting dictionary to validate it"),
    ] = True,
) -> None:
    """Convert curators' CSV maps into ConceptMap (and CodeSystem) JSON, then validate."""
    import json

    from mappings.dictionary_csv import resources_from_csv
    from mappings.terminology import DictionaryError, Terminology

    try:
        for source in sources:
            for resource in resources_from_csv(source.read_text("utf-8"), name=source.name):
                target = out / f"{resource['resourceType']}-{resource['id']}.json"
                text = json.dumps(resource, ensure_ascii=False, indent=2) + "\n"
                target.write_text(text, "utf-8")
                typer.echo(f"wrote {target}")
        if check:
            term = Terminology.load(out)
            typer.echo(f"dictionary {out}: version {term.version}, {len(term.files)} files")
    except (OSError, DictionaryError) as exc:
        typer.echo(f"import-csv: {exc}", err=True)
        raise typer.Exit(2) from exc


@dictionary_app.command("remap")
def dictionary_remap(
    data_dir: DataDir = None,
    dictionary_dir: Annotated[
        Path | None,
        typer.Option("--dictionary-dir", help="The new dictionary [env GATEWAY_DICTIONARY_DIR]"),
    ] = None,
    profile: Annotated[str | None, typer.Option("--profile")] = None,
    config: ConfigFile = None,
) -> None:
    """Re-apply the dictionary to records stored with unmapped codes (new record versions,
    anchored under the new dictionary version)."""
    import sys

    from gateway.remap import remap
    from gateway.runtime import Gateway
    from gateway.verify_cmd import _progress

    settings = _settings(config, profile=profile, data_dir=data_dir, dictionary_dir=dictionary_dir)
    configure_logging("WARNING")

    async def run() -> int:
        gw = Gateway(settings)
        await gw.start()
        try:
            s = await remap(gw, progress=_progress(sys.stderr, label="remap", unit="records"))
        finally:
            await gw.stop()
        typer.echo(
            f"remap: dictionary {gw.terminology.version}: {s.examined} records examined, "
            f"{s.tagged} tagged unmapped, {s.remapped} stored as new versions, "
            f"{s.still_unmapped} still with unmapped codes"
        )
        return 0

    try:
        code = asyncio.run(run())
    except GatewayError as exc:
        typer.echo(f"remap: {exc}", err=True)
        code = 2
    raise typer.Exit(code)


clients_app = typer.Typer(
    no_args_is_help=True, help="The client registry: who may ask this gateway for tokens."
)
app.add_typer(clients_app, name="clients")

Many = Annotated[list[str] | None, typer.Option()]


def _split(values: list[str] | None) -> tuple[str, ...]:
    return tuple(v for item in values or [] for v in item.replace(",", " ").split())


def _registry(config: Path | None, data_dir: Path | None) -> Any:
    from gateway.auth.registry import ClientRegistry, registry_path

    settings = _settings(config, data_dir=data_dir)
    return ClientRegistry(registry_path(settings.data_dir))


@clients_app.command("add")
def clients_add(
    client: Annotated[str, typer.Option("--client", help="Client id")],
    institution: Annotated[str, typer.Option("--institution", help="The client's institution")],
    jwks: Annotated[
        Path | None, typer.Option("--jwks", help="JSON file: a JWKS or one public JWK")
    ] = None,
    scope: Many = None,
    purpose: Many = None,
    role: Many = None,
    certificate: Annotated[
        list[Path] | None, typer.Option("--certificate", help="PEM client certificate (MLLP)")
    ] = None,
    break_glass: Annotated[bool, typer.Option("--break-glass")] = False,
    gateway: Annotated[bool, typer.Option("--gateway", help="Another member's gateway")] = False,
    portal: Annotated[bool, typer.Option("--portal", help="May ask for patient tokens")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Register (or replace) a client: keys, institution, scopes, purposes, roles."""
    import json
    import ssl

    from gateway.auth.errors import AuthError
    from gateway.auth.registry import ClientRecord
    from gateway.auth.tls import fingerprint

    try:
        keys: dict[str, Any] = {"keys": []}
        if jwks is not None:
            loaded = json.loads(jwks.read_text())
            keys = loaded if "keys" in loaded else {"keys": [loaded]}
        prints = tuple(
            fingerprint(ssl.PEM_cert_to_DER_cert(p.read_text())) for p in certificate or []
        )
        record = ClientRecord.from_json(
            {
                "client_id": client,
                "institution": institution,
                "jwks": keys,
                "scopes": _split(scope),
                "purposes": _split(purpose),
                "roles": _split(role),
                "certificates": prints,
                "break_glass": break_glass,
                "gateway": gateway,
                "portal": portal,
            }
        )
        _registry(config, data_dir).put(record)
    except (AuthError, OSError, ValueError) as exc:
        typer.echo(f"clients add: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"registered {client} ({institution})")


@clients_app.command("list")
def clients_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List the registered clients."""
    for c in _registry(config, data_dir).all():
        flags = [
            f
            for f, on in (
                ("gateway", c.gateway),
                ("portal", c.portal),
                ("break-glass", c.break_glass),
                ("DISABLED", c.disabled),
            )
            if on
        ]
        typer.echo(
            f"{c.client_id}\t{c.institution}\tkeys={','.join(c.key_algorithms()) or '-'}"
            f"\tscopes={' '.join(c.scopes) or '-'}\tpurposes={' '.join(c.purposes) or '-'}"
            f"\troles={' '.join(c.roles) or '-'}\t{' '.join(flags)}"
        )


@clients_app.command("disable")
def clients_disable(
    client: Annotated[str, typer.Argument(help="Client id")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Disable a client: its tokens stop working at once."""
    from gateway.auth.errors import AuthError

    try:
        _registry(config, data_dir).disable(client)
    except AuthError as exc:
        typer.echo(f"clients disable: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"disabled {client}")


@clients_app.command("self")
def clients_self(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Print this gateway's public JWKS (what peers register with ``clients add --gateway``)."""
    import json

    from gateway.auth.peer import gateway_key, public_jwks

    settings = _settings(config, data_dir=data_dir)
    typer.echo(json.dumps(public_jwks(gateway_key(settings))))


@app.command("dev-token")
def dev_token_cmd(
    client: Annotated[str, typer.Option("--client", help="Client id the token stands for")],
    scope: Annotated[str, typer.Option("--scope", help="SMART scopes, space-separated")],
    patient: Annotated[
        str | None, typer.Option("--patient", help="Master identifier value: a patient token")
    ] = None,
    institution: Annotated[str | None, typer.Option("--institution")] = None,
    purpose: Annotated[str | None, typer.Option("--purpose", help="Purposes of use")] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Print a dev access token (embedded profile only) on the last line."""
    from gateway.auth.dev import dev_token

    settings = _settings(config, data_dir=data_dir)
    try:
        token = dev_token(
            settings,
            client_id=client,
            scope=scope,
            patient=patient,
            institution=institution,
            purpose=purpose,
        )
    except GatewayError as exc:
        typer.echo(f"dev-token: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"dev token for {client} ({settings.profile} profile, {settings.data_dir}):")
    typer.echo(token)


erasure_app = typer.Typer(
    no_args_is_help=True, help="Erasure: shred what has come past retention (for cron)."
)
app.add_typer(erasure_app, name="erasure")


@erasure_app.command("run")
def erasure_run(
    data_dir: DataDir = None,
    profile: Annotated[str | None, typer.Option("--profile")] = None,
    config: ConfigFile = None,
) -> None:
    """One pass of the erasure job: crypto-shred the records of restricted patients that are
    past retention, and their keys when nothing of theirs is retained (gateway/erasure.py)."""
    from gateway.runtime import Gateway

    settings = _settings(config, profile=profile, data_dir=data_dir)
    settings = settings.model_copy(update={"erasure_interval_s": 0.0})
    configure_logging("WARNING")

    async def run() -> int:
        gw = Gateway(settings)
        await gw.start()
        try:
            results = await gw.erasure.run()
        finally:
            await gw.stop()
        shredded = sum(len(r.shredded) for r in results)
        keks = sum(len(r.keks_destroyed) for r in results)
        typer.echo(
            f"erasure: {len(gw.erasure_view.restricted_roots())} restricted pseudonym(s); "
            f"{shredded} record(s) shredded, {keks} patient key(s) destroyed now"
        )
        return 0

    try:
        code = asyncio.run(run())
    except GatewayError as exc:
        typer.echo(f"erasure: {exc}", err=True)
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
