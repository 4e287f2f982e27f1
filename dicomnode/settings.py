"""Typed settings: one YAML file, validated once at start and passed in.

Nothing here reads the environment at import time. Relative paths in the file are
resolved against the folder of the file, so a config can be moved with its data.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dicomnode.errors import ConfigError

logger = logging.getLogger(__name__)

# The project root when run from a checkout (editable install); the embedded default lives here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "dicomnode.yaml"


def default_config_path() -> Path:
    """Without --config: ./config/dicomnode.yaml (a folder `dicomnode init` wrote) if there is
    one, else the checkout's embedded default; an installed package has no writable default."""
    local = Path.cwd() / "config" / "dicomnode.yaml"
    if local.is_file():
        return local
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH
    raise ConfigError(
        "no settings file: pass --config PATH, or write a node folder with "
        "`dicomnode init DIR` and run from DIR")

# The default character repertoire, without backslash (the value separator).
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    if not value.strip() or not _AE_TITLE.match(value):
        raise ValueError("an AE title is 1-16 printable ASCII characters, not blank, no backslash")
    return value.strip()


Laterality = Literal["L", "R"]
InferenceBackend = Literal["onnxruntime", "remote"]
_BOTH_EYES: tuple[Laterality, ...] = ("L", "R")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_against_config(value: Path, info: ValidationInfo) -> Path:
    """A relative path in the settings file is relative to the file's folder."""
    base = (info.context or {}).get("base")
    value = value.expanduser()
    return value if value.is_absolute() or base is None else (base / value).resolve()


# A file named in the settings (certificates, keys, secrets): resolved like the other paths.
ConfigPath = Annotated[Path, AfterValidator(_resolve_against_config)]


class NodeTlsSettings(_Strict):
    """DICOM TLS (PS3.15 B.1, BCP 195): a second listener beside the plain `node.port`."""

    port: Annotated[int, Field(ge=1, le=65535)] = 2762  # IANA "dicom-tls"
    certificate: ConfigPath  # PEM; may hold the chain after the node's own certificate
    private_key: ConfigPath  # PEM, unencrypted
    # PEM CAs that client certificates are checked against.
    ca_certificates: ConfigPath | None = None
    # Mutual TLS (IHE ATNA): a caller without a certificate signed by those CAs is refused.
    require_client_certificate: bool = True


class NodeSettings(_Strict):
    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    # The plain (non-TLS) listener; null turns it off (TLS only).
    port: Annotated[int, Field(ge=1, le=65535)] | None = 11112
    tls: NodeTlsSettings | None = None
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 32
    # 0 = unlimited; a large PDU is what makes pynetdicom ingest fast (PITFALLS.md).
    max_pdu: Annotated[int, Field(ge=0)] = 0
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 30.0
    # From TCP connect to a complete A-ASSOCIATE-RQ: a connection that sends nothing (or a
    # trickle) holds an association slot only this long.
    association_request_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # Connections from one address at once; a further one first displaces that address's
    # oldest connection still without a request, else it is closed.
    max_associations_per_host: Annotated[int, Field(ge=1, le=1000)] = 32
    # Slots beyond max_associations that only callers on the allow-list may take.
    reserved_associations: Annotated[int, Field(ge=0, le=100)] = 2

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _one_listener(self) -> NodeSettings:
        if self.port is None and self.tls is None:
            raise ValueError("node.port is null and node.tls is not set: nothing to listen on")
        if self.tls is not None and self.port == self.tls.port:
            raise ValueError(f"node.port and node.tls.port are both {self.port}")
        return self


class CallerSettings(_Strict):
    ae_title: str
    host: str | None = None
    # RFC 4514 subject (`CN=CAM1,O=Eye Clinic`) the caller's TLS client certificate must have;
    # a caller with a pin is only admitted over TLS.
    certificate_subject: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("certificate_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from dicomnode.tls import parse_subject  # cryptography only where TLS is used

        try:
            parse_subject(value)
        except ValueError as exc:
            raise ValueError("not an RFC 4514 distinguished name such as "
                             f"'CN=CAM1,O=Eye Clinic' ({exc or 'unreadable'})") from exc
        return value


class ReceiveSettings(_Strict):
    # Processes that receive DICOM associations (storescp --fork's lever against the GIL):
    # each runs the association server on the node's listening sockets and stores into the
    # same database; planning, jobs, dispatch and the console stay in the main process.
    # 1 = in the main process, as a single process node always did.
    processes: Annotated[int, Field(ge=1, le=64)] = 1


class StorageSettings(_Strict):
    path: Path = Path("./var/storage")
    # Below this much free space, C-STORE answers "out of resources" instead of filling the disk.
    min_free_mb: Annotated[int, Field(ge=0)] = 1024
    # fsync the file and its folder before acknowledging: a success status is a promise.
    fsync: bool = True
    # Larger data sets are refused (0xA700); 0 = no limit.
    max_instance_mb: Annotated[int, Field(ge=0)] = 2048


class DatabaseSettings(_Strict):
    url: str = "sqlite:///./var/dicomnode.db"
    # A transient error (connection lost, serialization failure, lock timeout, SQLite busy)
    # is retried this many times, waiting retry_seconds, then twice as long each time.
    transient_retries: Annotated[int, Field(ge=0, le=20)] = 5
    retry_seconds: Annotated[float, Field(gt=0, le=60)] = 0.5


class CompletenessSettings(_Strict):
    quiet_seconds: Annotated[float, Field(ge=0)] = 5.0
    # A study holding an image of each of these lateralities is complete at once
    # (checked at the end of each association). Empty = quiet period only.
    expected_laterality: list[Laterality] = Field(default_factory=lambda: list(_BOTH_EYES))
    # Safety sweep that re-checks due studies, in case a timer was missed.
    sweep_seconds: Annotated[float, Field(gt=0)] = 10.0


class DestinationTlsSettings(_Strict):
    """DICOM TLS towards a DIMSE destination (C-STORE and C-ECHO)."""

    # PEM CAs the destination's certificate is checked against; none = the system's CAs.
    ca_certificates: ConfigPath | None = None
    # Our client certificate and key, for destinations that require one (both or neither).
    certificate: ConfigPath | None = None
    private_key: ConfigPath | None = None
    # The destination's certificate must name `host` (subject alternative name).
    verify_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> DestinationTlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: set both or neither")
        return self


class DestinationSettings(_Strict):
    """A DIMSE destination (C-STORE), the default `type`."""

    type: Literal["dimse"] = "dimse"
    ae_title: str
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: DestinationTlsSettings | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class BasicAuthSettings(_Strict):
    user: str
    password_file: ConfigPath  # the password is read from this file, never from the settings


class DicomWebAuthSettings(_Strict):
    bearer_token_file: ConfigPath | None = None
    basic: BasicAuthSettings | None = None

    @model_validator(mode="after")
    def _one(self) -> DicomWebAuthSettings:
        if (self.bearer_token_file is None) == (self.basic is None):
            raise ValueError("set exactly one of bearer_token_file and basic")
        return self


class DicomWebDestinationSettings(_Strict):
    """A DICOMweb destination: results are sent with STOW-RS (PS3.18 10.5)."""

    type: Literal["dicomweb"]
    # The service's base URL (STOW-RS goes to `<url>/studies`), e.g. https://pacs/dicom-web
    url: Annotated[str, Field(pattern=r"^https?://")]
    auth: DicomWebAuthSettings | None = None
    # true: verify the server's certificate with the system's CAs; false: do not (test rigs
    # only); a path: verify it against this PEM CA file.
    tls_verify: bool | ConfigPath = True
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0


def _destination_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "dimse"))
    return str(getattr(value, "type", "dimse"))


AnyDestination = Annotated[
    Annotated[DestinationSettings, Tag("dimse")]
    | Annotated[DicomWebDestinationSettings, Tag("dicomweb")],
    Discriminator(_destination_type),
]


class PathSettings(_Strict):
    path: Path


class PresetsSettings(PathSettings):
    # How often the node looks for changed preset and registry files (a cheap fingerprint;
    # a change is reloaded once it has held still for one interval). 0 = never: restart.
    watch_seconds: Annotated[float, Field(ge=0)] = 5.0


class LoggingSettings(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # text: "time LEVEL logger: message"; json: one JSON object per line (log shippers).
    format: Literal["text", "json"] = "text"


ExecutionProvider = Literal[
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
]


def _default_providers() -> list[ExecutionProvider]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class RemoteInferenceSettings(_Strict):
    """An Open Inference Protocol (KServe v2) server: Triton, KServe, MLServer, OpenVINO MS."""

    # Base URL, e.g. http://triton:8000 (the node POSTs to {url}/v2/models/{name}/infer).
    url: str = "http://127.0.0.1:8000"
    protocol: Literal["http"] = "http"
    # Per request (connect and read); a slower answer counts as the server being unavailable.
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # A refused, timed-out or 5xx request is retried after retry_delay * 2**(n-1) (at most
    # retry_max_delay) until retry_total_seconds have passed; then the job goes back to the
    # queue (never failed for it) and is tried again.
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 1.0
    retry_max_delay_seconds: Annotated[float, Field(gt=0)] = 30.0
    retry_total_seconds: Annotated[float, Field(ge=0)] = 120.0
    # Server-side name per model id where it differs (default: the model id); the version
    # sent is the registry version unless `send_version` is false.
    model_names: dict[str, str] = Field(default_factory=dict)
    send_version: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class InferenceSettings(_Strict):
    """How the graph runs: execution providers, threads, job leases, batching."""

    # Tried in order; ONNX Runtime falls back silently, so the one in use is read back from
    # each session. TensorrtExecutionProvider may be listed first on request.
    providers: list[ExecutionProvider] = Field(default_factory=_default_providers)
    # Job worker threads in this process (each runs one job at a time).
    workers: Annotated[int, Field(ge=0, le=64)] = 1
    # Models of one stage run at once, at most this many per job.
    model_threads: Annotated[int, Field(ge=1, le=64)] = 4
    # ONNX Runtime intra-op threads per session; 0 = its default (all cores).
    intra_op_threads: Annotated[int, Field(ge=0, le=256)] = 0
    # Let ONNX Runtime's idle intra-op threads spin for the next run (they then hold the
    # cores the executor pre-processes on): off unless a benchmark shows it pays.
    spin_wait: bool = False
    # A claimed job is another worker's to take once its lease lapses (worker died).
    lease_seconds: Annotated[float, Field(gt=0)] = 300.0
    # How often an idle worker looks for a job (a completed study also wakes it at once).
    poll_seconds: Annotated[float, Field(gt=0)] = 2.0
    # Largest batch per model run for inputs with a dynamic batch dimension.
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 16
    # ... and at most this much memory per run: inputs plus intermediate tensors (estimated
    # from the ONNX graph). ONNX Runtime keeps each session's largest run (a 768 x 768
    # segmenter: 100-730 MB per image of batch); at 256 MiB those run one image at a time.
    batch_bytes: Annotated[int, Field(ge=1)] = 256 << 20
    # A job decodes and runs its study in chunks of about this many bytes of decoded RGB
    # pixels (a chunk's working set, with its PIL copies and tensors, is ~3x that).
    chunk_bytes: Annotated[int, Field(ge=1)] = 64 << 20
    # Where job outputs go; relative paths resolve against the storage path.
    jobs_folder: str = "jobs"
    # Where session.run() happens: in this process (onnxruntime) or on `remote`; per-model
    # `backends` entries (model id -> backend) override it.
    backend: InferenceBackend = "onnxruntime"
    backends: dict[str, InferenceBackend] = Field(default_factory=dict)
    remote: RemoteInferenceSettings | None = None

    @model_validator(mode="after")
    def _remote_needed(self) -> InferenceSettings:
        if self.remote is None and (
            self.backend == "remote" or "remote" in self.backends.values()
        ):
            raise ValueError("backend 'remote' needs inference.remote.url")
        return self

    def backend_for(self, model_id: str) -> InferenceBackend:
        return self.backends.get(model_id, self.backend)
    # A job whose run ended its worker (crash, kill, lapsed lease) this many times is failed.
    max_job_attempts: Annotated[int, Field(ge=1, le=100)] = 3


class DispatchSettings(_Strict):
    """The outbox: how results are sent to destinations and retried (state lives in the DB)."""

    # Retry n (n = 1, 2, ...) waits first_delay * factor**(n-1), at most max_delay.
    first_delay_seconds: Annotated[float, Field(ge=0)] = 30.0
    factor: Annotated[float, Field(ge=1)] = 2.0
    max_delay_seconds: Annotated[float, Field(gt=0)] = 3600.0
    # After this many attempts a delivery is `failed` until an operator retries it.
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 10
    # Objects sent per destination over one association.
    batch_size: Annotated[int, Field(ge=1, le=10000)] = 50
    # An association whose objects are sent waits at most this long for the rest of a result
    # set this node is still encoding (its SR after its SEGs and overlays), then is released.
    linger_seconds: Annotated[float, Field(ge=0)] = 5.0
    # How often the dispatcher looks for due deliveries (enqueue also wakes it at once).
    poll_seconds: Annotated[float, Field(gt=0)] = 5.0
    # A delivery left `sending` by a node that died is retried once this has passed.
    lease_seconds: Annotated[float, Field(gt=0)] = 300.0
    # Calling AE title for C-STORE/C-ECHO; empty = the node's own AE title.
    calling_ae_title: str | None = None
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # After max_attempts a delivery is `failed` but still tried every slow_retry_seconds
    # until give_up_after_hours after it was queued (0 = no slow retries).
    slow_retry_seconds: Annotated[float, Field(gt=0)] = 900.0
    give_up_after_hours: Annotated[float, Field(ge=0)] = 72.0
    # A destination with failed deliveries is C-ECHOed this often; when it answers, its
    # failed deliveries are sent at once.
    echo_seconds: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("calling_ae_title")
    @classmethod
    def _calling(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else _check_ae_title(value)


class ResultsSettings(_Strict):
    """The results pipeline: how often a failed encoding of a finished job is tried.

    Its own section: `dispatch` retries sending objects that exist, this retries making them
    (a missing source image, damaged outputs), which has different causes and remedies.
    """

    # After this many failed attempts the result set stays `failed` until an operator retries.
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 3
    # Wait between a failed attempt and the next one.
    retry_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Jobs encoded at once (threads). Two on the reference 2-core machine: one study's SR,
    # SEGs and overlays are built while the next study's are, both beside inference; the
    # jobs of one study are still encoded one after another, in order.
    encoders: Annotated[int, Field(ge=1, le=32)] = 2


class RetentionSettings(_Strict):
    """Deleting received files and results once they are no longer needed (rows are kept).

    Ages count from the study's last received instance. None = keep for ever. Only studies
    whose results were delivered (or that had nothing to deliver) are purged by age;
    studies that failed wait `keep_failed_days`; nothing still receiving, processing or
    sending is ever purged.
    """

    received_days: Annotated[float, Field(ge=0)] | None = None
    results_days: Annotated[float, Field(ge=0)] | None = None
    keep_failed_days: Annotated[float, Field(ge=0)] | None = None
    # Below this much free space under storage.path, delivered studies go oldest first
    # (whatever their age) until it is free again; 0 = off.
    min_free_mb: Annotated[int, Field(ge=0)] = 0
    # How often the purge runs (APScheduler; also once shortly after start).
    interval_minutes: Annotated[float, Field(gt=0)] = 60.0

    @property
    def enabled(self) -> bool:
        return (self.received_days is not None or self.results_days is not None
                or self.keep_failed_days is not None or self.min_free_mb > 0)


class WebTlsSettings(_Strict):
    certificate: ConfigPath  # PEM; may hold the chain after the server's own certificate
    private_key: ConfigPath  # PEM, unencrypted


class WebSettings(_Strict):
    """The admin console and REST API (dicomnode.web), served inside the node."""

    enabled: bool = True
    # Loopback by default: the console changes what runs on patient images; expose it on
    # purpose (behind TLS termination) rather than by accident.
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080  # 0 = any free port (tests)
    # A console login lasts this long without being renewed.
    session_minutes: Annotated[int, Field(ge=1, le=60 * 24 * 30)] = 480
    # Mark the session cookie Secure (set when the console is only reached over HTTPS, e.g.
    # behind a TLS-terminating reverse proxy; always on with `web.tls`).
    secure_cookies: bool = False
    # Serve HTTPS directly (uvicorn's TLS); without it, put TLS termination in front.
    tls: WebTlsSettings | None = None
    # Password guessing: after this many failed logins within the window, for one user name
    # or from one client address, logins are refused unchecked until the window has passed.
    login_max_failures_per_user: Annotated[int, Field(ge=1, le=10000)] = 5
    login_max_failures_per_address: Annotated[int, Field(ge=1, le=100000)] = 20
    login_window_minutes: Annotated[int, Field(ge=1, le=60 * 24)] = 15
    # Reverse proxies (IP addresses) whose X-Forwarded-For / X-Forwarded-Proto are believed;
    # empty = none: the client address is the TCP peer's, whatever headers say.
    trusted_proxies: list[str] = Field(default_factory=list)
    # /api/health C-ECHOes each destination; answers are reused this long, so frequent polls
    # do not open an association at the PACS each time.
    health_echo_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 3.0
    health_cache_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # STOW-RS holds a request's body in memory while it splits the parts: a larger request
    # is refused with 413 before (Content-Length) or while (streamed) it is read.
    stow_max_request_mb: Annotated[int, Field(ge=1, le=1024 * 1024)] = 2048

    @property
    def cookies_secure(self) -> bool:
        """Session cookies are Secure when served over HTTPS here or behind a proxy."""
        return self.secure_cookies or self.tls is not None


class Settings(_Strict):
    node: NodeSettings = Field(default_factory=NodeSettings)
    callers: list[CallerSettings] = Field(default_factory=list)
    receive: ReceiveSettings = Field(default_factory=ReceiveSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    completeness: CompletenessSettings = Field(default_factory=CompletenessSettings)
    destinations: dict[str, AnyDestination] = Field(default_factory=dict)
    registry: PathSettings = Field(
        default_factory=lambda: PathSettings(path=Path("./model_registry"))
    )
    presets: PresetsSettings = Field(
        default_factory=lambda: PresetsSettings(path=Path("./presets"))
    )
    # modality -> preset id, used when no preset's routing conditions match.
    modality_defaults: dict[str, str] = Field(default_factory=dict)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    # Where the settings came from; relative paths were resolved against its folder.
    source: Path | None = None


def _format_location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for index, item in enumerate(loc):
        if index >= 2 and loc[index - 2] == "destinations" and item in ("dimse", "dicomweb"):
            continue  # the union's tag, not a key of the file
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve relative paths and a relative sqlite URL against the config file's folder."""
    for section in ("storage", "registry", "presets"):
        value = raw.get(section)
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            path = Path(value["path"]).expanduser()
            value["path"] = path if path.is_absolute() else (base / path).resolve()
    db = raw.get("database")
    if isinstance(db, dict) and isinstance(db.get("url"), str):
        db["url"] = resolve_sqlite_url(db["url"], base)
    return raw


def resolve_sqlite_url(url: str, base: Path) -> str:
    """Make `sqlite:///relative.db` absolute against `base`; other URLs pass unchanged."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str((base / url[len(prefix):]).resolve())
    return url


def load_settings(path: Path | str | None = None) -> Settings:
    """Load and validate a settings file; raise ConfigError naming the file and key."""
    config_path = Path(path) if path is not None else default_config_path()
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read settings file: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        raise ConfigError(f"{config_path}{where}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
    raw = _resolve_paths(raw, config_path.resolve().parent)
    raw["source"] = config_path.resolve()
    try:
        settings = Settings.model_validate(raw, context={"base": config_path.resolve().parent})
    except ValidationError as exc:
        problems = "; ".join(
            f"key '{_format_location(err['loc'])}': {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{config_path}: {problems}") from exc
    return settings
