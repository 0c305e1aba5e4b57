"""The one settings schema of pacsnode.

Every process (node, worker, trainer) reads the same YAML file, overridable per key by
environment variables ``PACSNODE_<SECTION>__<KEY>`` (e.g. ``PACSNODE_NODE__PORT=11113``).
Models are strict (``extra="forbid"``) so that a misspelt key is an error that names the key
instead of a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class Strict(BaseModel):
    """Base for every section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TLSSettings(Strict):
    """DICOM TLS (PS3.15 B.1) for the SCP or for one destination."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = Field(
        default=None, description="CA bundle used to verify the peer's certificate"
    )
    require_client_cert: bool = Field(
        default=False, description="SCP only: refuse peers without a certificate signed by ca_file"
    )

    @model_validator(mode="after")
    def _files_present(self) -> TLSSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file")
        return self


class PeerRule(Strict):
    """One entry of the calling-AE / host allow-list."""

    ae_title: str = Field(default="*", description="calling AE title, or * for any")
    hosts: list[str] = Field(description="IP addresses or CIDR networks the peer may call from")

    @field_validator("hosts")
    @classmethod
    def _valid_networks(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            ipaddress.ip_network(host, strict=False)
        return hosts


class NodeSettings(Strict):
    """The DICOM SCP and the node's own state."""

    ae_title: str = Field(default="PACSNODE", max_length=16)
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    data_dir: Path = Field(
        default=Path("pacsnode-data"),
        description="study store, index and embedded broker live below this folder",
    )
    store_dir: Path | None = Field(
        default=None, description="study store; default <data_dir>/store (a shared filesystem for remote workers)"
    )
    receivers: int = Field(
        default=0, ge=0, description="processes accepting C-STORE from the port the node binds; 0: one per CPU core; "
                                     "1: the node receives in its own process")
    max_associations: int = Field(default=32, ge=1)
    max_associations_per_host: int = Field(
        default=16, ge=1, description="one host cannot take every association slot"
    )
    acse_timeout_s: float = Field(default=10.0, gt=0, description="wait for A-ASSOCIATE-RQ / release")
    dimse_timeout_s: float = Field(default=30.0, gt=0)
    network_timeout_s: float = Field(default=30.0, gt=0, description="a silent peer is cut off after this")
    max_pdu_bytes: int = Field(
        default=1_048_576, ge=0, description="max PDU we receive; large PDUs mean fewer Python round trips"
    )
    min_free_disk_mb: int = Field(
        default=1024, ge=0, description="below this free space C-STORE answers 0xA700 (out of resources)"
    )
    quiet_period_s: float = Field(default=10.0, gt=0, description="a study is complete after this long without a new instance")
    expectation_settle_s: float = Field(
        default=2.0, ge=0,
        description="a routing expectation completes a study only after this long without a new instance "
                    "(the rest of a series still arriving)")
    allow_loopback: bool = Field(default=True, description="peers on 127.0.0.0/8 and ::1 need no allow-list entry")
    allowed_peers: list[PeerRule] = Field(
        default_factory=list, description="every non-loopback peer must match one entry"
    )
    tls: TLSSettings = Field(default_factory=TLSSettings)
    mpps: bool = Field(default=True, description="accept MPPS; N-SET COMPLETED completes a study early")
    uid_root: str = Field(
        default="2.25", description="root of the UIDs of results this node produces (recognised on return)"
    )
    manufacturer: str = Field(default="pacsnode", description="Contributing Equipment manufacturer of our results")

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not value.strip() or "\\" in value:
            raise ValueError("AE title must be 1-16 characters without backslash")
        return value.strip()

    @property
    def store_path(self) -> Path:
        return self.store_dir if self.store_dir is not None else self.data_dir / "store"

    @property
    def index_path(self) -> Path:
        return self.data_dir / "index.sqlite3"

    @property
    def receiver_processes(self) -> int:
        """How many receiver processes: 1 means the node receives in its own process."""
        return self.receivers or os.cpu_count() or 1


class BrokerSettings(Strict):
    """Where dispatches go and reports come from.

    ``url`` unset means the embedded broker: kombu's filesystem transport below the data
    folder, served by a real worker process that ``pacsnode serve`` starts.
    """

    url: SecretStr | None = Field(default=None, description="e.g. redis://127.0.0.1:6379/0; unset = embedded")
    visibility_timeout_s: int = Field(
        default=7200, ge=60, description="must exceed the longest task, or Redis redelivers it"
    )
    report_queue: str = "pacsnode.reports"
    connect_timeout_s: float = Field(default=3.0, gt=0)


class Destination(Strict):
    """A DICOM peer that receives results by C-STORE."""

    kind: Literal["dimse"] = "dimse"
    name: str
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(max_length=16)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    accepts_sr_seg: bool = Field(default=True, description="false: send Key Objects and Secondary Captures instead")


class DicomWebDestination(Strict):
    """A DICOMweb server that receives results by STOW-RS (``url``: its DICOMweb root, e.g.
    ``https://vna.example/dicom-web``), with a bearer token or basic credentials if it needs them."""

    kind: Literal["dicomweb"]
    name: str
    url: str = Field(pattern=r"^https?://")
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = Field(default=None, description="CA bundle to verify an https server (default: system)")
    accepts_sr_seg: bool = Field(default=True, description="false: send Key Objects and Secondary Captures instead")

    @model_validator(mode="after")
    def _one_auth(self) -> DicomWebDestination:
        if self.token is not None and self.username is not None:
            raise ValueError("a dicomweb destination takes token or username/password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("a dicomweb destination needs username and password together")
        return self


def _destination_kind(value: Any) -> str:
    """``kind`` of a destination entry; entries without one are DIMSE peers (as before kinds existed)."""
    kind = value.get("kind", "dimse") if isinstance(value, dict) else getattr(value, "kind", "dimse")
    return str(kind)


AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


MatchOperator = Literal["equals", "in", "regex", "range"]


class AttributeCondition(Strict):
    """One test of one series attribute (a multi-valued attribute matches if any value does)."""

    attribute: Literal[
        "Modality", "BodyPartExamined", "SOPClassUID", "ImageType", "SeriesDescription",
        "StudyDescription", "SliceThickness", "Rows", "Columns", "InstanceCount",
    ]
    equals: str | float | None = None
    in_: list[str] | None = Field(default=None, alias="in")
    regex: str | None = None
    min: float | None = None
    max: float | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_operator(self) -> AttributeCondition:
        given = [
            self.equals is not None,
            self.in_ is not None,
            self.regex is not None,
            self.min is not None or self.max is not None,
        ]
        if sum(given) != 1:
            raise ValueError(f"condition on {self.attribute} needs exactly one of equals, in, regex, min/max")
        if self.regex is not None:
            re.compile(self.regex)
        return self


class AllOf(Strict):
    all: list[Condition]


class AnyOf(Strict):
    any: list[Condition]


Condition = Annotated[AllOf | AnyOf | AttributeCondition, Field(union_mode="left_to_right")]
AllOf.model_rebuild()
AnyOf.model_rebuild()


class Expectation(Strict):
    """What a rule needs, so a study can complete before the quiet period ends."""

    min_instances: int | None = Field(default=None, ge=1)
    series_descriptions: list[str] = Field(
        default_factory=list, description="regexes; each must match one received series"
    )

    @field_validator("series_descriptions")
    @classmethod
    def _regexes(cls, values: list[str]) -> list[str]:
        for value in values:
            re.compile(value)
        return values


class RoutingRule(Strict):
    """Sends studies with a series matching ``match`` to ``pipeline``."""

    name: str
    pipeline: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    priority: Literal["urgent", "routine"] = "routine"
    match: Condition
    expect: Expectation | None = None


class RoutingSettings(Strict):
    rules: list[RoutingRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> RoutingSettings:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"routing rule names must be unique: {', '.join(duplicates)}")
        return self


class RetentionSettings(Strict):
    """Purging of finished studies; studies in flight are never purged."""

    processed_max_age_days: float = Field(default=30, gt=0)
    unmatched_max_age_days: float = Field(default=7, gt=0)
    max_disk_used_percent: float = Field(default=85, gt=0, le=100)
    interval_s: float = Field(default=3600, gt=0)


class ExportSettings(Strict):
    """The export outbox: result files C-STOREd to the destinations, retried with back-off.

    A failed attempt waits ``min(base_backoff_s * 2**attempts, max_backoff_s)``; the defaults
    retry for about 20 hours (30 attempts) before an export is marked failed for good.
    """

    base_backoff_s: float = Field(default=5.0, gt=0, description="wait after the first failed attempt")
    max_backoff_s: float = Field(default=3600.0, gt=0, description="the longest wait between attempts")
    max_attempts: int = Field(default=30, ge=1, description="then the export is failed (permanent) and listed")
    poll_s: float = Field(default=1.0, gt=0, description="how often due exports are looked for")


class Hl7Notification(Strict):
    """A RIS (or interface engine) that gets an HL7 v2.5 ORU^R01 for every finished study, over MLLP,
    through a persistent outbox with the retry schedule of ``exports``; an ACK (MSA-1 AA or CA) is
    required, anything else is retried."""

    kind: Literal["hl7"] = "hl7"
    name: str
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "PACSNODE"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    timeout_s: float = Field(default=10.0, gt=0, description="connect and ACK wait")


class UrgentFinding(Strict):
    """A finding that makes a study urgent when a model calls it present."""

    pipeline: str
    finding: str


class TriageSettings(Strict):
    """Which positive calls put a study first on the worklist and first in the RIS notifications."""

    urgent: list[UrgentFinding] = Field(
        default_factory=lambda: [UrgentFinding(pipeline="ct-hemorrhage", finding="any")],
        description="default: intracranial hemorrhage called present")


class WorkerSettings(Strict):
    embedded: bool = Field(default=True, description="pacsnode serve starts one worker process itself")
    embedded_log: Path | None = Field(
        default=None, description="the embedded worker's output goes here (appended); unset: the node's console"
    )
    concurrency: int = Field(default=1, ge=1, description="processes per worker; one per GPU")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    max_attempts: int = Field(default=3, ge=1, description="a study that kills its worker this often ends failed")
    models_dir: Path = Path("pacsnode-data/models")


def is_loopback_host(host: str) -> bool:
    """True for an address (or ``localhost``) that only this machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


class HttpSettings(Strict):
    """Health, Prometheus metrics, and the worklist (JSON API and web page).

    The worklist names studies by UID, so anything reachable from another machine must be
    behind authentication: a non-loopback ``host`` with ``auth: none`` is refused.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    auth: Literal["none", "token", "basic"] = Field(
        default="none", description="token: Authorization: Bearer <token>; basic: HTTP basic with users"
    )
    token: SecretStr | None = Field(default=None, description="the bearer token (auth: token), at least 16 characters")
    users: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="auth: basic: user -> password, plain or a pbkdf2_sha256$... hash (python -m node.auth)",
    )
    audit_log: Path | None = Field(
        default=None, description="JSON lines of who viewed what; default <data_dir>/audit.log"
    )
    show_patient_name: bool = Field(
        default=False, description="the worklist shows patient names; needs auth token or basic (never logged)"
    )
    refresh_s: int = Field(default=30, ge=0, le=3600, description="the worklist page reloads itself; 0: never")

    @model_validator(mode="after")
    def _exposed_needs_auth(self) -> HttpSettings:
        if self.auth == "token" and (self.token is None or len(self.token.get_secret_value()) < 16):
            raise ValueError("http.auth: token needs http.token of at least 16 characters")
        if self.auth == "basic" and not self.users:
            raise ValueError("http.auth: basic needs at least one entry in http.users")
        if self.auth == "basic" and any(":" in user or not user for user in self.users):
            raise ValueError("http.users: a user name must be non-empty and without ':'")
        if self.show_patient_name and self.auth == "none":
            raise ValueError("http.show_patient_name needs http.auth token or basic: names are shown only to"
                             " authenticated, audited users")
        if self.enabled and self.auth == "none" and not is_loopback_host(self.host):
            raise ValueError(
                f"http.host {self.host!r} is not loopback: set http.auth to token or basic"
                " (the worklist would be open to the network)"
            )
        return self


class LoggingSettings(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=True, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Settings(BaseSettings):
    """Everything configurable, in one tree."""

    model_config = SettingsConfigDict(
        env_prefix="PACSNODE_", env_nested_delimiter="__", extra="forbid", yaml_file=None
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    destinations: list[AnyDestination] = Field(default_factory=list)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    exports: ExportSettings = Field(default_factory=ExportSettings)
    notifications: list[Hl7Notification] = Field(default_factory=list)
    triage: TriageSettings = Field(default_factory=TriageSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, destinations: list[AnyDestination]) -> list[AnyDestination]:
        """Exports are kept per destination name: two destinations must not share one."""
        names = [dest.name for dest in destinations]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return destinations

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first; pydantic-settings merges the sources' mappings key by key
        # (lists are replaced whole), so a site file layers over the shipped defaults.
        files = settings_cls.model_config.get("yaml_file") or ()
        assert isinstance(files, list | tuple), "load_settings gives a list of files"
        return (init_settings, env_settings, *(YamlConfigSettingsSource(settings_cls, yaml_file=f) for f in files))


def default_config_path() -> Path:
    """The commented default configuration shipped with the package."""
    return Path(__file__).with_name("pacsnode.yaml")


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """The shipped defaults, merged with the site file ``path`` if given, then environment overrides.

    A site file only says what differs: its sections merge into the shipped ones key by key, and a
    list it gives (``routing.rules``, ``destinations``, ``node.allowed_peers``) replaces the shipped
    list whole; ``routing: {rules: []}`` therefore means "no routing". That is what an admin who
    writes a file holding only ``destinations:`` expects: the shipped routing still applies.

    Raises ``FileNotFoundError`` for a missing file and ``pydantic.ValidationError`` naming
    each bad key.
    """
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    files = [default_config_path()] if path is None else [path, default_config_path()]

    class _FromFiles(Settings):
        model_config = SettingsConfigDict(yaml_file=files)

    return _FromFiles(**overrides)
