"""The settings of ``fastpunch agent``: one table, four sources, as for
``ccs serve`` (fastpunch.ccs.config): a TOML key (``key_file``), an
environment variable (``FASTPUNCH_AGENT_KEY_FILE``), a flag
(``--key-file``) and a default; flag > environment > file > default, and a
bad value is a ``ConfigError`` naming the setting and its source before
anything starts.

The services the agent exposes are one setting, ``services``. In TOML::

    [services]
    camera-rtsp = "127.0.0.1:554"                            # to every peer the CCS allows
    web = { target = "127.0.0.1:80", peers = ["viewer-1"] }  # to viewer-1 only

As a flag or variable: ``camera-rtsp=127.0.0.1:554,web=127.0.0.1:80`` (the
per-service ``peers`` narrowing is TOML's only). ``peers`` narrows every
service at once. The CCS's ACL stays the authority: a peer it does not allow
never reaches the agent; these only narrow it further.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from fastpunch.ccs.config import (
    ConfigError, Setting, _Bad, _integer, _text, add_table_arguments, load_table, parse_hostport,
    unknown_environment as _unknown_environment,
)
from fastpunch.proto.mux import (
    DEFAULT_MAX_STREAMS, DEFAULT_MAX_WINDOW, INITIAL_WINDOW, valid_label,
)

__all__ = ["AgentConfig", "Service", "SETTINGS", "ConfigError", "load", "parse_services",
           "add_arguments", "unknown_environment", "ENV_PREFIX", "CONFIG_ENV",
           "DEFAULT_STATUS_SOCKET"]

ENV_PREFIX = "FASTPUNCH_AGENT_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
DEFAULT_STATUS_SOCKET = "/run/fastpunch/agent.sock"
#: labels the agent keeps for itself (the service list); no service may take them
RESERVED = frozenset({"?services"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Service:
    """A local TCP service the agent exposes under ``name``; ``peers``:
    who may use it (None: every peer the CCS and ``peers`` allow)."""
    name: str
    host: str
    port: int
    peers: Optional[Tuple[str, ...]] = None

    def as_dict(self) -> dict:
        out: dict = {"target": f"{self.host}:{self.port}"}
        if self.peers is not None:
            out["peers"] = list(self.peers)
        return out


def _service_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not valid_label(name):
        raise _Bad(f"service names of 1-64 letters, digits, '.', '_' or '-' (not {name!r})")
    return name


def _target(value: Any, name: str) -> tuple:
    try:
        host, port = parse_hostport(value)
    except _Bad:
        raise _Bad(f"HOST:PORT for service {name!r}, a port 1-65535 (not {value!r})") from None
    if not host or port == 0:
        raise _Bad(f"HOST:PORT for service {name!r}, a port 1-65535 (not {value!r})")
    return host, port


def _peer_names(value: Any, where: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(p, str) and p and len(p) <= 255 for p in value):
        raise _Bad(f"a list of device names{where}")
    return tuple(value)


def parse_services(value: Any) -> Mapping[str, Service]:
    """``services`` from TOML (a table) or from text (NAME=HOST:PORT,...)."""
    if isinstance(value, str):
        table: dict = {}
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, target = item.strip().partition("=")
            if not sep:
                raise _Bad(f"NAME=HOST:PORT[,NAME=HOST:PORT...] (not {item.strip()!r})")
            if name.strip() in table:
                raise _Bad(f"each service once ({name.strip()!r} twice)")
            table[name.strip()] = target.strip()
        value = table
    if not isinstance(value, dict):
        raise _Bad("a table of NAME = \"HOST:PORT\" (or NAME = { target = ..., peers = [...] })")
    out = {}
    for name, spec in value.items():
        name = _service_name(name)
        if name in RESERVED:
            raise _Bad(f"a name not reserved by the agent ({name!r} is)")
        peers = None
        if isinstance(spec, dict):
            unknown = set(spec) - {"target", "peers"}
            if unknown or "target" not in spec:
                raise _Bad(f"service {name!r} as {{ target = \"HOST:PORT\", peers = [...] }}"
                           + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
            if "peers" in spec:
                peers = _peer_names(spec["peers"], f" for service {name!r}")
            spec = spec["target"]
        host, port = _target(spec, name)
        out[name] = Service(name, host, port, peers)
    return out


def _hostports(value: Any) -> tuple:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise _Bad("one or more HOST:PORT (a TOML array, or comma-separated)")
    out = []
    for v in value:
        host, port = parse_hostport(v)
        if not host or port == 0:
            raise _Bad(f"HOST:PORT with a port 1-65535 (not {v!r})")
        out.append((host, port))
    return tuple(out)


def _peers(value: Any) -> Optional[Tuple[str, ...]]:
    return _peer_names(value, "")


def _strategies(value: Any) -> Tuple[str, ...]:
    from fastpunch.punch.planner import STRATEGIES

    known = list(STRATEGIES) + ["relay"]
    names = _peer_names(value, "")
    if not names or any(n not in known for n in names):
        raise _Bad(f"strategy names from {', '.join(known)}")
    return names


def _nat(value: Any) -> str:
    from fastpunch.proto.kinds import NatClass

    kinds = {k.value for k in NatClass} | {"auto"}
    if not isinstance(value, str) or value not in kinds:
        raise _Bad(f"one of {', '.join(sorted(kinds))}")
    return value


def _keepalive(value: Any) -> Any:
    period = _integer(0, 3600, "whole seconds 0-3600 (0: none)")(value)
    return False if period == 0 else period


_seconds = _integer(1, 3600, "whole seconds, 1-3600")


def _s(key, check, default, text, metavar="VALUE", **kw) -> Setting:
    return Setting(key, check, default, text, metavar, prefix=ENV_PREFIX, **kw)


SETTINGS = (
    _s("ccs", _hostports, None, "CCS nodes (comma-separated: the agent fails over between "
       "them)", "HOST:PORT[,...]", shown="required"),
    _s("name", _text, None, "this device's name", "NAME", shown="required"),
    _s("key_file", _text, None, "credentials from `fastpunch ccs add-device`", "FILE",
       shown="required"),
    _s("ca", _text, None, "the deployment's ca.pem (pinned)", "FILE", shown="required"),
    _s("server_name", _text, None, "TLS name of the CCS", "NAME", shown="the host given",
       optional=True),
    _s("nat", _nat, "auto", "this device's NAT kind (auto: natcheck finds out)", "KIND"),
    _s("keepalive", _keepalive, None, "keepalive period of peer streams, 0 = none", "SECONDS",
       shown="the CCS's", optional=True),
    _s("services", parse_services, {}, "local TCP services to expose: NAME=HOST:PORT,... "
       "(TOML: a [services] table, with per-service peers)", "NAME=HOST:PORT[,...]",
       shown="none"),
    _s("peers", _peers, None, "devices that may use any service (the CCS's ACL still "
       "applies)", "NAME[,...]", shown="all the CCS allows", optional=True),
    _s("strategies", _strategies, None, "strategies instead of the CCS's plan, in order (the "
       "peers must ask alike; add relay to allow it)", "NAME[,...]", shown="the plan",
       optional=True),
    _s("max_streams", _integer(1, 4096, "an integer 1-4096"), DEFAULT_MAX_STREAMS,
       "streams one peer may hold open at once", "N"),
    _s("stream_window", _integer(INITIAL_WINDOW, 1 << 30, f"bytes, {INITIAL_WINDOW}-{1 << 30}"),
       DEFAULT_MAX_WINDOW, "the most one stream may have in flight towards us (its window "
       "grows to this while the reader keeps up; what a stalled reader can make us hold)",
       "BYTES"),
    _s("max_peers", _integer(1, 4096, "an integer 1-4096"), 16,
       "peers served at once (those beyond wait for a slot)", "N"),
    _s("punches", _integer(1, 64, "an integer 1-64"), 2,
       "offers punched at once (more wait their turn: each punch holds a port, raw "
       "sockets and an nftables table while it runs)", "N"),
    _s("connect_timeout", _seconds, 10, "seconds to reach a local service", "SECONDS"),
    _s("status_socket", _text, DEFAULT_STATUS_SOCKET, "where `fastpunch agent status` asks "
       "(a unix socket, owner only; empty: none)", "PATH", optional=True),
)
BY_KEY = {s.key: s for s in SETTINGS}
REQUIRED = ("ccs", "name", "key_file", "ca")
#: what SIGHUP may change without a restart
RELOADABLE = frozenset({"services", "peers", "max_streams", "stream_window",
                        "connect_timeout"})


@dataclass(frozen=True)
class AgentConfig:
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    file: Optional[str] = None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def services(self) -> Mapping[str, Service]:
        return self.values["services"]

    def allows(self, service: Service, peer: str) -> bool:
        """Whether ``peer`` may use ``service`` (beyond what the CCS allows)."""
        everyone = self.values["peers"]
        if everyone is not None and peer not in everyone:
            return False
        return service.peers is None or peer in service.peers

    def offered_to(self, peer: str) -> list:
        """The services ``peer`` may use, by name."""
        return sorted(n for n, s in self.services.items() if self.allows(s, peer))

    def shown(self) -> dict:
        out = {}
        for key, source in self.sources.items():
            if source == "default":
                continue
            value = self.values[key]
            if key == "services":
                value = {n: s.as_dict() for n, s in value.items()}
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[key] = {"value": value, "from": source}
        return out

    def changed(self, other: "AgentConfig") -> set:
        return {k for k in self.values if self.values[k] != other.values[k]}


def load(flags: Mapping[str, Optional[str]], environ: Mapping[str, str] = os.environ) \
        -> AgentConfig:
    """Flag > environment > file > default; the required settings must be
    somewhere."""
    values, sources, path = load_table(SETTINGS, CONFIG_ENV, flags, environ)
    missing = [k for k in REQUIRED if values[k] is None]
    if missing:
        s = BY_KEY[missing[0]]
        raise ConfigError(f"agent: {missing[0]} is required: give {s.flag}, {s.env} or "
                          f"'{s.key}' in the --config file", missing[0])
    if values["status_socket"] == "":
        values["status_socket"] = None
    return AgentConfig(values, sources, path)


def unknown_environment(environ: Mapping[str, str] = os.environ) -> list:
    """FASTPUNCH_AGENT_* variables that name no setting (a typo would
    otherwise leave its setting at the default without a word)."""
    return _unknown_environment(environ, SETTINGS, CONFIG_ENV, ENV_PREFIX)


def add_arguments(parser) -> None:
    add_table_arguments(parser, SETTINGS, CONFIG_ENV)


def flags_of(args) -> dict:
    return {s.key: getattr(args, s.key, None) for s in SETTINGS} | \
        {"config": getattr(args, "config", None)}
