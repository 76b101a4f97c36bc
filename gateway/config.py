"""Configuration: one YAML file parsed once into frozen pydantic models.

Unknown keys are rejected everywhere. Each device is validated by its driver
family's own model (found through the registry). Errors are collected and
rendered as ``FILE: path.to.field: message``; the CLI exits 2 on them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.commands.names import KNOWN_COMMANDS
from gateway.commands.signing import load_key
from gateway.driver import ID_PATTERN, DeviceConfig, DriverContext
from gateway.errors import CommandError, ConfigError
from gateway.events import Severity
from gateway.registry import families

REGION_PATTERN = r"^\d{6}$"  # GB/T 2260 administrative division code
MIN_TOKEN = 16  # characters of the local API's bearer token: not guessable on a shared box


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Identity(Model):
    school: str = Field(pattern=ID_PATTERN, description="school id, a topic level")
    gateway: str = Field(pattern=ID_PATTERN, description="gateway id, a topic level")
    region: str = Field(default="", description="6-digit GB/T 2260 code; empty if not used")

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if v and not re.match(REGION_PATTERN, v):
            raise ValueError("must be a 6-digit GB/T 2260 administrative division code, e.g. 530102")
        return v


class Endpoint(Model):
    """One broker: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""

    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"{url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from exc
        tls = parts.scheme == "mqtts"
        return cls(host=parts.hostname, port=port or (8883 if tls else 1883), tls=tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class TlsConfig(Model):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(default=False, description="skip hostname verification (lab use only)")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class RouteConfig(Model):
    """Which events an uplink gets: type patterns (``*`` wildcard) and a minimum severity."""

    types: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    min_severity: Severity = Severity.INFO

    @field_validator("types", "exclude")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not re.fullmatch(r"[a-z0-9_.*]+", p):
                raise ValueError(f"{p!r}: a pattern is dotted lower-case names with * wildcards")
        return v


class CommandsConfig(Model):
    """The commands an uplink's platform may send (docs/INTEGRATION.md, "Commands")."""

    # File holding the HMAC-SHA256 key shared with the platform (>= 32 bytes after stripping
    # whitespace). None: this uplink takes no commands and the gateway does not subscribe.
    key_file: Path | None = None
    allow: tuple[str, ...] = ()
    # 40 s into the past: an MQTT hop through a backup broker after a failover, plus a few
    # seconds of clock difference (both ends NTP-synced). Older means stale: a lockdown
    # order from a minute ago is not acted on.
    skew_past: float = Field(default=40.0, ge=0, le=3600)
    # 20 s into the future: clock difference only (a command cannot arrive before it was
    # issued), so half the past window.
    skew_future: float = Field(default=20.0, ge=0, le=3600)
    # 300 s longest validity: a platform may retry one command for 5 minutes; the replay
    # cache keeps each id for its validity plus skew_past, so this bounds the cache.
    max_ttl: float = Field(default=300.0, gt=0, le=3600)
    # 4 KiB: a command is a few hundred bytes; anything larger is refused before parsing.
    max_bytes: int = Field(default=4096, ge=256, le=65536)

    @field_validator("allow")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if name not in KNOWN_COMMANDS:
                raise ValueError(f"unknown command {name!r}; known: {', '.join(sorted(KNOWN_COMMANDS))}")
        if len(set(v)) != len(v):
            raise ValueError("a command is listed twice")
        return v

    @model_validator(mode="after")
    def _key_for_allow(self) -> CommandsConfig:
        if self.allow and self.key_file is None:
            raise ValueError("allow needs key_file: commands are verified with the uplink's key")
        return self

    def read_key(self) -> bytes | None:
        """The HMAC key (stripped bytes), or None without key_file. Raises CommandError."""
        if self.key_file is None:
            return None
        return load_key(self.key_file)


class PlatformConfig(Model):
    """The platform behind an uplink: its presence and its acknowledgements of critical alarms.

    A PUBACK only says the broker took a message (DESIGN.md, Guarantees); these settings let
    the gateway know the platform itself is there and has seen what matters.
    """

    # The platform's retained presence topic, {"online": bool, "timestamp": ms}, which it
    # sets to offline with its own will (Sparkplug B's primary host STATE). While it is not
    # online the uplink keeps its events in the outbox. None: publish whenever connected.
    presence_topic: str | None = None
    # Alarm types re-notified until the platform answers alarm.ack for the event id (patterns
    # with *, as in route.types); only their active events. Empty: no re-notification.
    ack_types: tuple[str, ...] = ("alarm.panic",)
    # 30 s between re-notifications: an operator answers a panic within a minute; a lost
    # first copy is then repeated before the 30 s ack deadline's trouble is even raised.
    renotify_interval: float = Field(default=30.0, ge=0.5, le=3600)
    # 20 repeats (10 min at 30 s): long past any operator's reaction; then trouble is raised.
    renotify_limit: int = Field(default=20, ge=0, le=10_000)
    # An alarm the platform has not acknowledged this long after it happened is trouble
    # (the rules: the center sees an alarm within seconds; 30 s covers the operator's click).
    ack_deadline: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("presence_topic")
    @classmethod
    def _presence(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "#+") or "\x00" in v):
            raise ValueError("a topic name without wildcards")
        return v

    @field_validator("ack_types")
    @classmethod
    def _ack_types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not re.fullmatch(r"alarm\.[a-z0-9_.*]+", p):
                raise ValueError(f"{p!r}: ack_types are alarm types (alarm.panic, alarm.*)")
        return v


class UplinkConfig(Model):
    name: str = Field(pattern=ID_PATTERN)
    endpoints: tuple[Endpoint, ...] = Field(min_length=1, description="primary first, then backups")
    client_id: str = ""
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig = TlsConfig()
    topic_prefix: str = "campus/{region}"
    # 5 s keepalive: a frozen broker is noticed within 1.5 x keepalive (MQTT 3.1.1 s3.1.2.10),
    # well inside the 30 s an alarm center tolerates; the traffic cost is 2 bytes every 5 s.
    keepalive: float = Field(default=5.0, ge=1, le=600)
    # Alarms must reach the center within about 2 s (the rules); no PUBACK by then is trouble.
    alarm_deadline: float = Field(default=2.0, gt=0, le=120)
    # 32 in flight: throughput saturates past 10 on loopback; more covers WAN round trips.
    inflight: int = Field(default=32, ge=1, le=1000)
    # Reconnect backoff: first retry soon (a broker restart takes ~1 s), capped so a
    # long outage is probed every 10 s without hammering the center.
    reconnect_initial: float = Field(default=0.25, gt=0, le=60)
    reconnect_max: float = Field(default=10.0, gt=0, le=600)
    # Connect (TCP + TLS + CONNACK) must finish in this time or the next endpoint is tried.
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    route: RouteConfig = RouteConfig()
    # Per-uplink outbox bound (rows); when full the lowest priority, oldest, non-alarm rows go.
    outbox_max_rows: int = Field(default=200_000, ge=100)
    commands: CommandsConfig = CommandsConfig()
    platform: PlatformConfig | None = None

    @model_validator(mode="after")
    def _acks_need_commands(self) -> UplinkConfig:
        if self.platform is not None and self.platform.ack_types and "alarm.ack" not in self.commands.allow:
            raise ValueError(
                "platform.ack_types needs commands.allow to include alarm.ack (and a key_file):"
                " the platform acknowledges with a signed alarm.ack; or set ack_types: []"
            )
        return self

    @field_validator("endpoints", mode="before")
    @classmethod
    def _endpoints(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list | tuple):
            return tuple(Endpoint.parse(x) if isinstance(x, str) else x for x in v)
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if any(c in v for c in "#+") or v.startswith("/") or v.endswith("/"):
            raise ValueError("no wildcards, no leading or trailing '/'")
        try:
            v.format(region="r", school="s", gateway="g")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"unknown placeholder {exc}; allowed: {{region}}, {{school}}, {{gateway}}"
            ) from exc
        return v

    def read_password(self) -> SecretStr | None:
        if self.password_file is None:
            return None
        return SecretStr(self.password_file.read_text().strip())


class ApiConfig(Model):
    """The local API for technicians: a Unix socket (mode 0660; its permissions are the
    access control), and optionally TCP on loopback, where writes need the bearer token."""

    socket: Path | None = Path("/run/campus-gateway/api.sock")
    tcp: str | None = Field(default=None, description="127.0.0.1:PORT; loopback only")
    token_file: Path | None = Field(default=None, description="bearer token for writes over TCP")

    @field_validator("tcp")
    @classmethod
    def _tcp(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{v!r}: HOST:PORT")
        if host not in ("127.0.0.1", "::1", "[::1]", "localhost"):
            raise ValueError(f"{v!r}: the local API listens on loopback only")
        return v

    @model_validator(mode="after")
    def _token(self) -> ApiConfig:
        if self.tcp is not None and self.token_file is None:
            raise ValueError("api.tcp needs api.token_file (writes over TCP need a bearer token)")
        return self

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        if self.tcp is None:
            return None
        host, _, port = self.tcp.rpartition(":")
        return host.strip("[]"), int(port)

    def read_token(self) -> str | None:
        if self.token_file is None:
            return None
        return self.token_file.read_text(encoding="utf-8").strip()


class GatewayConfig(Model):
    identity: Identity
    state_dir: Path = Path("/var/lib/campus-gateway")
    profiles_dir: Path | None = None
    # 30 s heartbeat: the education platform's online check runs every minute or two.
    heartbeat_interval: float = Field(default=30.0, ge=1, le=3600)
    # 15 min online patrol: the education bureau's rules check every camera a few times an
    # hour; a snapshot from every camera each time costs little.
    patrol_interval: float = Field(default=900.0, ge=10, le=86400)
    api: ApiConfig = ApiConfig()
    uplinks: tuple[UplinkConfig, ...] = Field(min_length=1)
    devices: tuple[Annotated[DeviceConfig, Field()], ...] = ()

    @property
    def driver_context(self) -> DriverContext:
        dirs = (self.profiles_dir,) if self.profiles_dir else ()
        return DriverContext(profile_dirs=dirs, state_dir=self.state_dir / "devices")


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _issues(err: ValidationError, prefix: Sequence[int | str] = ()) -> list[tuple[str, str]]:
    issues = []
    for e in err.errors(include_url=False):
        loc = [*prefix, *e["loc"]]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required"
        issues.append((_loc(loc), msg))
    return issues


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, f"invalid YAML: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {exc}")]) from exc


def parse(data: Any, source: str, base_dir: Path | None = None) -> GatewayConfig:
    """Validate a decoded YAML document. Relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the top level must be a mapping")])
    issues: list[tuple[str, str]] = []
    raw_devices = data.get("devices") or []
    if base_dir is not None and isinstance(raw_devices, list):
        # A device's files (``password_file``...) are relative to the config file too.
        raw_devices = [
            _rebase(d, [k for k in d if k.endswith("_file")], base_dir) if isinstance(d, dict) else d
            for d in raw_devices
        ]
    core = {k: v for k, v in data.items() if k != "devices"}
    cfg: GatewayConfig | None = None
    try:
        cfg = GatewayConfig.model_validate(_resolve_paths(core, base_dir))
    except ValidationError as exc:
        issues.extend(_issues(exc))
    devices = _devices(raw_devices, issues)
    if cfg is not None and not issues:
        cfg = cfg.model_copy(update={"devices": tuple(devices)})
        issues.extend(_semantic(cfg))
    if issues or cfg is None:
        raise ConfigError(source, issues)
    return cfg


def _resolve_paths(core: dict[str, Any], base: Path | None) -> dict[str, Any]:
    if base is None:
        return core
    out = _rebase(core, ("state_dir", "profiles_dir"), base)
    if isinstance(out.get("api"), dict):
        out["api"] = _rebase(out["api"], ("socket", "token_file"), base)
    if isinstance(out.get("uplinks"), list):
        ups = []
        for item in out["uplinks"]:
            up = item
            if isinstance(up, dict):
                up = _rebase(up, ("password_file",), base)
                if isinstance(up.get("tls"), dict):
                    up["tls"] = _rebase(up["tls"], ("ca_file", "cert_file", "key_file"), base)
                if isinstance(up.get("commands"), dict):
                    up["commands"] = _rebase(up["commands"], ("key_file",), base)
            ups.append(up)
        out["uplinks"] = ups
    return out


def _rebase(node: dict[str, Any], keys: Sequence[str], base: Path) -> dict[str, Any]:
    """Relative path values are relative to the config file's directory."""
    out = dict(node)
    for key in keys:
        if isinstance(out.get(key), str) and not Path(out[key]).is_absolute():
            out[key] = str(base / out[key])
    return out


def _devices(raw: Any, issues: list[tuple[str, str]]) -> list[DeviceConfig]:
    if not isinstance(raw, list):
        issues.append(("devices", "must be a list"))
        return []
    known = families()
    out: list[DeviceConfig] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            issues.append((f"devices[{i}]", "must be a mapping"))
            continue
        name = item.get("driver")
        fam = known.get(name) if isinstance(name, str) else None
        if fam is None:
            choices = ", ".join(sorted(known)) or "none installed"
            issues.append((f"devices[{i}].driver", f"unknown driver {name!r}; known: {choices}"))
            continue
        try:
            out.append(fam.device_model.model_validate(item))
        except ValidationError as exc:
            issues.extend(_issues(exc, ("devices", i)))
    return out


def _semantic(cfg: GatewayConfig) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, dev in enumerate(cfg.devices):
        if dev.id in seen:
            issues.append(
                (f"devices[{i}].id", f"duplicate device id {dev.id!r} (also devices[{seen[dev.id]}])")
            )
        seen.setdefault(dev.id, i)
    names: dict[str, int] = {}
    for i, up in enumerate(cfg.uplinks):
        if up.name in names:
            issues.append((f"uplinks[{i}].name", f"duplicate uplink name {up.name!r}"))
        names.setdefault(up.name, i)
        if "{region}" in up.topic_prefix and not cfg.identity.region:
            issues.append((f"uplinks[{i}].topic_prefix", "uses {region} but identity.region is not set"))
        issues.extend(_uplink_files(i, up))
    token = cfg.api.token_file
    if token is not None:
        if not token.is_file():
            issues.append(("api.token_file", f"no such file: {token}"))
        elif len(token.read_text(encoding="utf-8").strip()) < MIN_TOKEN:
            issues.append(("api.token_file", f"the token must be at least {MIN_TOKEN} characters"))
    index = {id(d): i for i, d in enumerate(cfg.devices)}
    by_family: dict[str, list[DeviceConfig]] = {}
    for dev in cfg.devices:
        by_family.setdefault(dev.driver, []).append(dev)
    known = families()
    for name, devs in by_family.items():
        for j, path, message in known[name].check(devs, cfg.driver_context):
            where = f"devices[{index[id(devs[j])]}]" + (f".{path}" if path else "")
            issues.append((where, message))
    return issues


def _uplink_files(i: int, up: UplinkConfig) -> list[tuple[str, str]]:
    """The files an uplink names exist; its command key is long enough."""
    issues: list[tuple[str, str]] = []
    for field_name in ("password_file",):
        path = getattr(up, field_name)
        if path is not None and not path.is_file():
            issues.append((f"uplinks[{i}].{field_name}", f"no such file: {path}"))
    for field_name in ("ca_file", "cert_file", "key_file"):
        path = getattr(up.tls, field_name)
        if path is not None and not path.is_file():
            issues.append((f"uplinks[{i}].tls.{field_name}", f"no such file: {path}"))
    key_file = up.commands.key_file
    if key_file is not None:
        if not key_file.is_file():
            issues.append((f"uplinks[{i}].commands.key_file", f"no such file: {key_file}"))
        else:
            try:
                load_key(key_file)
            except CommandError as exc:
                issues.append((f"uplinks[{i}].commands.key_file", str(exc)))
    return issues


def load(path: Path) -> GatewayConfig:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [("", f"cannot read: {exc}")]) from exc
    return parse(_yaml(text, source), source, base_dir=path.parent)


LogFormat = Literal["json", "console", "auto"]
