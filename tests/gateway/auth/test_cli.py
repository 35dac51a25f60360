"""``gateway clients add|list|disable|self`` and ``gateway dev-token``."""

from __future__ import annotations

import json
from pathlib import Path

from joserfc.jwk import ECKey
from typer.testing import CliRunner

from gateway.auth.guard import issuer_of, token_key
from gateway.auth.registry import ClientRegistry, registry_path
from gateway.auth.tls import fingerprint
from gateway.auth.tokens import TokenService
from gateway.backends.state_memory import MemoryStateStore
from gateway.cli import app
from gateway.config import Settings
from tests.gateway.auth.certs import CA

runner = CliRunner()


def test_clients_add_list_disable(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    key = ECKey.generate_key("P-384", private=True, auto_kid=True)
    public = dict(key.as_dict(private=False), alg="ES384")
    (tmp_path / "jwk.json").write_text(json.dumps(public))
    cert = CA(tmp_path / "pki").issue("lis", server=False)
    args = ["clients", "add", "--client", "lis-1", "--institution", "h1", "--data-dir", str(data)]
    r = runner.invoke(
        app,
        [
            *args,
            "--jwks", str(tmp_path / "jwk.json"),
            "--scope", "system/*.c system/Observation.rs",
            "--purpose", "TREAT",
            "--role", "labtech",
            "--certificate", str(cert.cert),
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    record = ClientRegistry(registry_path(data)).get("lis-1")
    assert record is not None and record.key_algorithms() == {key.kid: "ES384"}
    assert record.certificates == (fingerprint(cert.der),)
    assert record.scopes == ("system/*.c", "system/Observation.rs")
    listing = runner.invoke(app, ["clients", "list", "--data-dir", str(data)])
    assert "lis-1\th1" in listing.output and "ES384" not in listing.output.split("\t")[0]
    # a private key, an unknown purpose, a malformed scope are refused
    private = dict(key.as_dict(private=True), alg="ES384")
    (tmp_path / "private.json").write_text(json.dumps(private))
    for extra in (
        ["--jwks", str(tmp_path / "private.json")],
        ["--purpose", "FUN"],
        ["--scope", "system/Observation"],
        ["--scope", "patient/*.rs"],  # patient scopes only for portals
    ):
        bad = runner.invoke(app, [*args, *extra])
        assert bad.exit_code == 2, (extra, bad.output)
    r = runner.invoke(app, ["clients", "disable", "lis-1", "--data-dir", str(data)])
    assert r.exit_code == 0
    disabled = ClientRegistry(registry_path(data)).get("lis-1")
    assert disabled is not None and disabled.disabled
    assert (
        runner.invoke(app, ["clients", "disable", "nobody", "--data-dir", str(data)]).exit_code == 2
    )


def test_clients_self_prints_a_public_jwks(tmp_path: Path) -> None:
    r = runner.invoke(app, ["clients", "self", "--data-dir", str(tmp_path / "gw")])
    assert r.exit_code == 0, r.output
    jwks = json.loads(r.output)
    (key,) = jwks["keys"]
    assert key["alg"] == "ES384" and key["crv"] == "P-384" and "d" not in key


def test_dev_token_command(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    r = runner.invoke(
        app,
        ["dev-token", "--client", "his", "--scope", "system/*.rs", "--purpose", "TREAT HPAYMT",
         "--institution", "other-hospital", "--data-dir", str(data)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    token = r.output.strip().splitlines()[-1]
    settings = Settings(profile="embedded", data_dir=data)
    service = TokenService(
        key=token_key(settings),
        issuer=issuer_of(settings),
        institution=settings.institution,
        registry=ClientRegistry(registry_path(data)),
        state=MemoryStateStore(),
    )
    caller = service.verify(f"Bearer {token}")
    assert (caller.client_id, caller.institution, caller.kind) == (
        "his",
        "other-hospital",
        "system",
    )
    assert caller.purposes == ("TREAT", "HPAYMT") and caller.dev
    r = runner.invoke(
        app, ["dev-token", "--client", "p", "--scope", "patient/*.rs", "--patient", "HC-1",
              "--data-dir", str(data)],
    )  # fmt: skip
    patient = service.verify("Bearer " + r.output.strip().splitlines()[-1])
    assert patient.kind == "patient" and patient.patient and patient.purposes == ("PATRQT",)
    refused = runner.invoke(
        app,
        ["dev-token", "--client", "his", "--scope", "system/*.rs", "--data-dir", str(data)],
        env={"GATEWAY_PROFILE": "production"},
    )
    assert refused.exit_code == 2 and "production" in refused.output
