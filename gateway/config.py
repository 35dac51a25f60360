"""Gateway settings: one pydantic-settings class, every field also a ``GATEWAY_*`` variable.

Settings are built once by the CLI (command-line options > environment > ``--config`` file >
defaults) and handed to :func:`gateway.app.create_app`; nothing reads them from a module global.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.errors import ConfigurationError

Profile = Literal["embedded", "production"]


class SenderProfile(BaseModel):
    """How the gateway treats one sender's input (an HL7 v2 sender by MSH-3/MSH-4, or a FHIR
    client by its client id): the one place per-sender policy lives.

    ``strict_types``: a value that does not fit its HL7 type (a non-numeric OBX-5 under NM)
    rejects the message (AE) instead of being kept as text with a warning (AA + ERR W).
    ``missing_master_id``: a patient sent without the alliance's master identifier gets a
    provisional pseudonym (linked later) or is rejected. ``unmapped_codes``: a local code the
    unified dictionary cannot map is kept (original coding only) or rejected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    strict_types: bool = False
    missing_master_id: Literal["provisional", "reject"] = "provisional"
    unmapped_codes: Literal["accept", "reject"] = "accept"


class Settings(BaseSettings):
    """Everything a gateway needs to run. Raises pydantic.ValidationError on bad values."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    profile: Profile = "embedded"
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    http_port: int = 8080
    mllp_port: int = 2575
    mllp_enabled: bool = True

    # Identity of this institution in the alliance.
    institution: str = "demo-hospital"
    ledger_origin: str = "alliance.example/ledger"
    # The alliance's master patient identifier system (e.g. resident health card number).
    master_id_system: str = "urn:oid:2.16.156.10011.1.19"
    default_tz: str = "Asia/Shanghai"
    # HL7 v2: assigning authority (namespace or universal id) -> identifier system URI; whether
    # local codes the unified dictionary cannot map are rejected (AE, 103) instead of kept.
    hl7_authority_systems: dict[str, str] = {}
    # Per-sender policy (see SenderProfile), keyed by an HL7 sender ``MSH-3^MSH-4`` (either
    # part may be ``*``), or by a FHIR client id; ``default`` applies to everyone else.
    sender_profiles: dict[str, SenderProfile] = {}
    default_sender_profile: SenderProfile = SenderProfile()
    # This gateway process's name in the shared state (the owner of its HL7 de-duplication
    # claims): the same after a restart, distinct for every gateway process running at once.
    # Empty: derived from the institution, the host name and data_dir.
    instance_id: str = ""
    # Processes converting HL7 v2 to FHIR beside the gateway's own (0: convert in-process);
    # each batch of messages is split over them.
    hl7_convert_workers: int = 2
    # The unified dictionary's directory (default: the one shipped in mappings/dictionary).
    dictionary_dir: Path | None = None
    # DICOMweb base URL written into ImagingStudy endpoints.
    imaging_endpoint_base: str | None = None
    # Public keys of the alliance's institutions (JSON); default: data_dir/trust.json with our own.
    trust_file: Path | None = None

    # Secrets. When unset, the embedded profile creates them under data_dir on first start.
    pseudonym_key: SecretStr | None = None
    master_key: SecretStr | None = None
    # The alliance consent key (hex, 32 bytes) sealing every member's Consents; unset: derived
    # from the pseudonym key with HKDF (gateway/consents.py), which every member holds too.
    consent_key: SecretStr | None = None

    # Production services.
    kubo_url: str = "http://127.0.0.1:15001"
    nats_urls: str = "nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"
    nats_stream: str = "ALLIANCE_LEDGER"
    nats_replicas: int = 3
    redis_url: str = "redis://127.0.0.1:16379/0"
    # Key prefix in Redis (default ``gw:<institution>:``): the workers of one gateway share it.
    redis_prefix: str | None = None
    # The search index of the production profile (the embedded one keeps a SQLite file under
    # data_dir/search); rows are kept per institution, so gateways may share a database.
    postgres_url: str = "postgresql://gateway@127.0.0.1:15432/gateway"
    # Maintain the FHIR search index (and serve search). Off: no search routes, no index
    # writes; for a gateway that only ingests, and to measure what the index costs.
    search_index: bool = True

    # Limits and batching.
    max_body_bytes: int = 4 * 1024 * 1024
    max_bundle_entries: int = 1000
    max_mllp_message_bytes: int = 4 * 1024 * 1024
    mllp_idle_timeout: float = 300.0
    batch_max_leaves: int = 500
    # How long the ledger waits for more leaves before it appends a batch; the leaves of
    # messages that arrived together come together anyway (2 ms measured 8% faster than 5).
    batch_max_delay_ms: float = 2.0
    backend_timeout: float = 10.0
    # How often the ledger follower looks for other writers' batches (0: never; the views then
    # catch up only when this gateway writes, and consent freshness checks read the log).
    ledger_follow_interval_ms: float = 1000.0

    # Witnesses (docs/ledger-format.md, "Witness protocol"): a checkpoint is final once
    # ``witness_quorum`` institutions other than its writer cosigned it (0: a lone gateway).
    witness_quorum: int = 0
    # Comma-separated base URLs of peer gateways whose witnesses this gateway asks to cosign.
    witness_peers: str = ""
    witness_timeout: float = 2.0
    witness_interval_ms: float = 200.0
    # How long a write may wait for its checkpoint to become final (cosigned by the quorum) so
    # that its receipts carry the cosigned checkpoint; 0: answer at once with the writer-signed
    # checkpoint (GET /ledger/receipt gives the cosigned one later). On timeout the writer-signed
    # checkpoint is used: the data is durable either way.
    receipt_wait_final_ms: float = 0.0
    # Anchor the trust file with a ``key`` leaf of action ``trust`` at start when not yet anchored.
    anchor_trust: bool = True

    # Who may call (gateway/auth/). Access tokens last at most 5 minutes (SMART); their key is
    # data_dir/secrets/token.key unless given (hex, 32 bytes or more). The token URL client
    # assertions name as ``aud`` is ``public_base_url`` + /auth/token (default: the request's).
    token_lifetime: int = Field(default=300, ge=1, le=300)
    token_key: SecretStr | None = None
    public_base_url: str | None = None
    # TLS for HTTPS and MLLP: this gateway's certificate and key, and the CA that signs the
    # alliance's client certificates (MLLP peers, other gateways: mutual TLS). Without them,
    # plain sockets are allowed on loopback only.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # The client a plain loopback MLLP connection is taken to be (embedded profile, tests).
    mllp_local_sender: str = "local-mllp"
    # Benchmark only (bench/bench_auth.py): every request is taken as the local sender, no
    # token checked. Never set it on a gateway that serves anyone.
    auth_off_for_benchmark: bool = False
    # Benchmark only (bench/bench_reads.py): tokens are still checked, but the record access
    # check allows everything and no access is logged or anchored. Never set it in service.
    access_off_for_benchmark: bool = False

    # Erasure (gateway/erasure.py): retention period in years per record class (0: not
    # retained, shredded as soon as the patient asks), after the record's clinical date. China:
    # outpatient records 15 years, inpatient records 30 (医疗机构病历管理规定 2013, art. 29).
    retention_years: dict[str, int] = {"outpatient": 15, "inpatient": 30, "not-retained": 0}
    # Resource type -> retention class (every other type: retention_default_class; an
    # Encounter whose class is one of retention_inpatient_codes, and a record referencing such
    # an Encounter, is "inpatient"; the Patient resource is kept while anything else is).
    retention_classes: dict[str, str] = {"Appointment": "not-retained"}
    retention_default_class: str = "outpatient"
    retention_inpatient_codes: list[str] = ["IMP", "ACUTE", "NONAC"]
    # How often the erasure job shreds what has come past retention for restricted patients
    # (seconds; it also runs at once when a restriction is applied). 0: only `gateway erasure
    # run` (cron).
    erasure_interval_s: float = Field(default=3600.0, ge=0)

    log_level: str = "INFO"

    def sender_profile(self, *keys: str) -> SenderProfile:
        """The profile of the first of ``keys`` that has one (most specific first), else the
        default."""
        for key in keys:
            found = self.sender_profiles.get(key)
            if found is not None:
                return found
        return self.default_sender_profile

    @property
    def nats_servers(self) -> list[str]:
        """The NATS URLs as a list."""
        return [u.strip() for u in self.nats_urls.split(",") if u.strip()]


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a TOML/JSON file, the environment and explicit overrides.

    Precedence: ``overrides`` (command-line options) > ``GATEWAY_*`` environment > file > defaults.
    Raises ConfigurationError when the file cannot be read or parsed.
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            text = config_file.read_text(encoding="utf-8")
            file_values = json.loads(text) if config_file.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read config file {config_file}: {exc}") from exc
    env_set = Settings()  # environment and defaults
    merged: dict[str, Any] = {}
    for name in Settings.model_fields:
        env_key = f"GATEWAY_{name.upper()}"
        if name in overrides and overrides[name] is not None:
            merged[name] = overrides[name]
        elif _env_has(env_key):
            merged[name] = getattr(env_set, name)
        elif name in file_values:
            merged[name] = file_values[name]
    unknown = set(file_values) - set(Settings.model_fields)
    if unknown:
        raise ConfigurationError(f"unknown settings in {config_file}: {sorted(unknown)}")
    return Settings(**merged)


def _env_has(key: str) -> bool:
    import os

    return key in os.environ


def default_settings_for_tests(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for an embedded gateway in ``data_dir`` (used by tests and the demo)."""
    values: dict[str, Any] = {"profile": "embedded", "data_dir": data_dir}
    values.update(overrides)
    return Settings(**values)


__all__ = ["Profile", "Settings", "default_settings_for_tests", "load_settings"]
