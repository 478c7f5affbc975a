"""The settings of ``fastpunch ccs serve``: one table, four sources.

Every setting has a TOML key (``relay_port``), an environment variable
(``FASTPUNCH_CCS_RELAY_PORT``), a flag (``--relay-port``) and a default.
The first of flag, environment, file and default that gives a value wins.
A value from any source goes through its setting's one check, and a bad
one (an unknown key, a wrong type, a port past 65535...) is a
``ConfigError`` naming the setting and where the value came from, before
anything is started.

The server's limits (``fastpunch.ccs.budget.Budgets``) are settings too,
one per field, so a limit added there is configurable here without an edit.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from fastpunch.errors import FastpunchError

DEFAULT_DIR = "/var/lib/fastpunch/ccs"
ENV_PREFIX = "FASTPUNCH_CCS_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


class ConfigError(FastpunchError, ValueError):
    """A setting of ``ccs serve`` is unknown or bad; ``setting`` and
    ``source`` say which and from where."""

    def __init__(self, message: str, setting: Optional[str] = None,
                 source: Optional[str] = None) -> None:
        super().__init__(message)
        self.setting, self.source = setting, source


class _Bad(ValueError):
    """What a value should have been (a phrase: 'a port, 0-65535')."""


# -- checks: each takes the text of a flag or variable, or a TOML value ----------------
Check = Callable[[Any], Any]


def _integer(lo: int, hi: Optional[int] = None, what: str = "an integer") -> Check:
    def check(value: Any) -> int:
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            if not re.fullmatch(r"[+-]?[0-9]+", text):
                raise _Bad(what)
            value = int(text)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(what)
        if value < lo or (hi is not None and value > hi):
            raise _Bad(what)
        return value
    check.what, check.numeric = what, True     # type: ignore[attr-defined]
    return check


def _above_zero(what: str) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _Bad(what) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(what)
        if not math.isfinite(value) or value <= 0:
            raise _Bad(what)
        return float(value)
    check.what, check.numeric = what, True     # type: ignore[attr-defined]
    return check


_seconds = _above_zero("a number of seconds above 0")
_positive_number = _above_zero("a number above 0")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _Bad("a non-empty string")
    return value


def _node(value: Any) -> str:
    # any text (it is only ever a label and part of Redis key names); the
    # metrics escape it
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 255:
        raise _Bad("a non-empty string of at most 255 characters")
    return value


def parse_hostport(value: Any) -> tuple:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port), the port 0-65535."""
    what = "HOST:PORT with a port 0-65535"
    if not isinstance(value, str):
        raise _Bad(what)
    host, sep, port = value.strip().rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise _Bad(what)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _ipv4(value: Any) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise _Bad("an IPv4 address") from None


def _ipv6(value: Any) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        ip = ipaddress.IPv6Address(value.strip().strip("[]"))
    except ValueError:
        raise _Bad("an IPv6 address") from None
    if ip.ipv4_mapped is not None or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        raise _Bad("a global IPv6 address (not IPv4-mapped, link-local, :: or multicast)")
    return str(ip)


def _redis_url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"(redis|rediss|unix)://", value.strip()):
        raise _Bad("a redis://, rediss:// or unix:// URL")
    return value.strip()


_PORT_OR_OFF = _integer(-1, 65535, "a port 0-65535 (0 = any), or -1 for none")


@dataclass(frozen=True)
class Setting:
    key: str                        # the TOML key; the flag and the variable follow from it
    check: Check
    default: Any
    help: str
    metavar: str = "VALUE"
    shown: Optional[str] = None     # the default as --help says it, when not the value itself
    optional: bool = False          # may be unset (None); an empty flag or variable unsets it
    prefix: str = ENV_PREFIX        # of its environment variable (another command's table)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return self.prefix + self.key.upper()

    @property
    def default_text(self) -> str:
        return self.shown if self.shown is not None else str(self.default)


def _hostname() -> str:
    return socket.gethostname()


GENERAL = (
    Setting("dir", _text, DEFAULT_DIR, "deployment directory: server.pem, server.key, keys.db "
            "(ccs serve never reads ca.key)", "DIR"),
    Setting("listen", parse_hostport, ("0.0.0.0", 7443), "where devices connect (TLS)",
            "HOST:PORT", shown="0.0.0.0:7443"),
    Setting("relay_port", _PORT_OR_OFF, 7444, "relay port, also answering address probes; "
            "0 = any, -1 = no relay", "PORT"),
    Setting("probe_port", _PORT_OR_OFF, 7445, "a second port answering address probes "
            "(natcheck sees whether a mapping depends on the destination port); 0 = any, "
            "-1 = none", "PORT"),
    Setting("public_addr", _ipv4, None, "IPv4 address devices reach the relay and probes "
            "at", "ADDR", shown="the --listen host", optional=True),
    Setting("public_addr6", _ipv6, None, "IPv6 address devices reach the relay and probes "
            "at (with --listen [::]:PORT, which takes both families: devices that log in "
            "over IPv4 learn it and announce IPv6 candidates)", "ADDR",
            shown="the --listen host if IPv6, else none", optional=True),
    Setting("metrics", parse_hostport, None, "serve /metrics, /healthz and /readyz here",
            "HOST:PORT", shown="off", optional=True),
    Setting("redis", _redis_url, None, "share presence with other nodes through Redis "
            "(needs cluster.key)", "URL", shown="off: one node", optional=True),
    Setting("node", _node, None, "this node's name", "NAME", shown="this host's name"),
    Setting("heartbeat", _integer(1, 3600, "whole seconds, 1-3600"), 15,
            "seconds between device heartbeats (a device silent for 3 is dropped)", "SECONDS"),
    Setting("keepalive", _integer(1, 3600, "whole seconds, 1-3600"), 10,
            "keepalive period devices give their peer streams (and this node its relay "
            "legs): keep it under the shortest idle timeout of the gateways on the way",
            "SECONDS"),
    Setting("rendezvous_timeout", _seconds, 30.0, "seconds a rendezvous waits for its peer",
            "SECONDS"),
    Setting("auth_timeout", _seconds, 10.0, "seconds a connection has to log in after TLS",
            "SECONDS"),
    Setting("relay_max", _integer(1, what="an integer, 1 or more"), 256,
            "concurrent relays, whole node", "N"),
    Setting("relay_per_device", _integer(1, what="an integer, 1 or more"), 4,
            "concurrent relays per device", "N"),
    Setting("relay_quota", _integer(1, what="a number of bytes, 1 or more"), None,
            "relay bytes per device", "BYTES", shown="unlimited", optional=True),
    Setting("ready_file", _text, None, "write {host, port, relay_port, probe_port, node, "
            "metrics} here as JSON once listening", "FILE", shown="none", optional=True),
)

# what each of the server's budgets means, for --help (a field without a
# line here still gets a setting: see _budget_settings)
_BUDGET_HELP = {
    "messages_per_second": "messages a second one device may send after login",
    "message_burst": "messages one device may send at once above that rate",
    "rendezvous_in_flight": "rendezvous one device may have asked for at once",
    "offers_per_pair": "offers one device may have outstanding to one peer",
    "offers_pending": "offers a device may leave unanswered, from everyone",
    "write_buffer": "bytes queued to one device before it is cut",
    "preauth_per_source": "connections not logged in yet, per source address",
    "preauth_total": "connections not logged in yet, in all",
    "handshake_timeout": "seconds for a device's TLS handshake",
    "probes_per_source": "filtering probes at once, per source address",
    "relay_hellos_per_source": "relay connections yet to say who they are, per source address",
}


def _budget_settings() -> tuple:
    try:
        from fastpunch.ccs.budget import Budgets
    except ImportError:             # a server without budgets: no such settings
        return ()
    out = []
    for f in dataclasses.fields(Budgets):
        default = f.default
        if isinstance(default, bool):
            continue                        # no yes/no budgets today
        if isinstance(default, int):
            check, metavar = _integer(1, what="an integer, 1 or more"), "N"
        elif f.name.endswith("timeout"):
            check, metavar = _seconds, "SECONDS"
        else:
            check, metavar = _positive_number, "NUMBER"
        out.append(Setting(f.name, check, default,
                           _BUDGET_HELP.get(f.name, f"the server's {f.name} budget"), metavar))
    return tuple(out)


BUDGETS = _budget_settings()
SETTINGS = GENERAL + BUDGETS
BY_KEY = {s.key: s for s in SETTINGS}


def add_arguments(parser) -> None:
    """One flag per setting; each help says its variable and ends with its default."""
    add_table_arguments(parser, SETTINGS, CONFIG_ENV,
                        {"node": f"this host's name, {_hostname()}"})


def add_table_arguments(parser, settings, config_env: str,
                        shown: Optional[Mapping[str, str]] = None) -> None:
    """--config and a flag per setting of one table (``shown``: defaults
    said otherwise than their text), each help with its variable and its
    default; every flag's value is None unless given (load_table's rule)."""
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML file of these settings, keys as the flags without the "
                             f"leading dashes, '_' for '-' [env {config_env}] (default: none)")
    for s in settings:
        text = f"{s.help} [env {s.env}] (default: {(shown or {}).get(s.key, s.default_text)})"
        parser.add_argument(s.flag, dest=s.key, metavar=s.metavar, default=None,
                            help=text.replace("%", "%%"))


@dataclass(frozen=True)
class ServeConfig:
    """Every setting's value and where it came from ("default", "flag --x",
    "environment FASTPUNCH_CCS_X", "config file PATH")."""
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    file: Optional[str] = None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def budgets(self) -> dict:
        return {s.key: self.values[s.key] for s in BUDGETS}

    def shown(self) -> dict:
        """The settings not at their defaults, for the log (a Redis password
        is not shown)."""
        out = {}
        for key, source in self.sources.items():
            if source == "default":
                continue
            value = self.values[key]
            if key == "redis" and value:
                value = _redact(value)
            out[key] = {"value": list(value) if isinstance(value, tuple) else value,
                        "from": source}
        return out


def _redact(url: str) -> str:
    """A URL without its password (user:password@ -> ***@)."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def _toml():
    try:
        import tomllib
        return tomllib
    except ImportError:
        pass
    try:
        import tomli
        return tomli
    except ImportError:
        raise ConfigError("reading a --config file needs tomllib (Python 3.11+) or the "
                          "tomli package on this Python: pip install tomli", "config") from None


def read_file(path: str, by_key: Optional[Mapping[str, Setting]] = None) -> dict:
    """The TOML file's settings, each checked: unknown keys and wrong
    types are errors. ``by_key``: the table (default: ccs serve's)."""
    by_key = BY_KEY if by_key is None else by_key
    toml = _toml()
    where = f"config file {path}"
    try:
        with open(path, "rb") as f:
            data = toml.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file", "config", where) from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: a directory, not a file", "config", where) from None
    except PermissionError:
        raise ConfigError(f"{where}: not readable (permission denied)", "config", where) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text ({exc.reason})", "config", where) from None
    except toml.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}", "config", where) from None
    out = {}
    for key, value in data.items():
        setting = by_key.get(key)
        if setting is None:
            near = difflib.get_close_matches(key.replace("-", "_"), list(by_key), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where}: unknown setting {key!r}{hint}; known: "
                              f"{', '.join(by_key)}", key, where)
        out[key] = _checked(setting, value, where, from_text=False)
    return out


def _checked(setting: Setting, value: Any, where: str, *, from_text: bool) -> Any:
    if from_text and setting.optional and value.strip() == "":
        return None
    try:
        if not from_text and isinstance(value, str) and getattr(setting.check, "numeric", False):
            raise _Bad(f"{getattr(setting.check, 'what', 'a number')} (a TOML number, "
                       "not a string)")
        return setting.check(value)
    except _Bad as bad:
        shown = value if from_text else _toml_repr(value)
        if setting.key == "redis":
            shown = _redact(str(shown))
        raise ConfigError(f"{where}: {setting.key} = {shown!s}: expected {bad}",
                          setting.key, where) from None


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (dict, list)):
        return f"a TOML {'table' if isinstance(value, dict) else 'array'}"
    return repr(value)


def load(flags: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> ServeConfig:
    """Flag > environment > file > default. ``flags`` maps a setting's key
    (and "config") to the flag's text or None when not given."""
    values, sources, path = load_table(SETTINGS, CONFIG_ENV, flags, environ)
    if values["node"] is None:
        values["node"] = _hostname()
    if BUDGETS:
        from fastpunch.ccs.budget import Budgets

        try:
            Budgets(**{s.key: values[s.key] for s in BUDGETS})
        except (TypeError, ValueError) as exc:      # its own checks, past ours
            raise ConfigError(f"the server's budgets refuse these settings: {exc}") from None
    return ServeConfig(values, sources, path)


def load_table(settings, config_env: str, flags: Mapping[str, Optional[str]],
               environ: Mapping[str, str]) -> tuple:
    """One table's values, sources and config file: flag > environment >
    file > default, every value checked."""
    path = flags.get("config")
    if path is None:
        path = environ.get(config_env) or None
    from_file = read_file(path, {s.key: s for s in settings}) if path is not None else {}
    values, sources = {}, {}
    for s in settings:
        text = flags.get(s.key)
        if text is not None:
            where = f"flag {s.flag}"
            values[s.key], sources[s.key] = _checked(s, text, where, from_text=True), where
        elif s.env in environ:
            where = f"environment {s.env}"
            values[s.key] = _checked(s, environ[s.env], where, from_text=True)
            sources[s.key] = where
        elif s.key in from_file:
            values[s.key], sources[s.key] = from_file[s.key], f"config file {path}"
        else:
            values[s.key], sources[s.key] = s.default, "default"
    return values, sources, path


def unknown_environment(environ: Mapping[str, str], settings=None, config_env: str = CONFIG_ENV,
                        prefix: str = ENV_PREFIX) -> list:
    """``prefix``* variables (FASTPUNCH_CCS_* unless another table's are
    asked for) that name no setting of ``settings``: typos, most likely."""
    known = {s.env for s in (SETTINGS if settings is None else settings)} | {config_env}
    return sorted(k for k in environ if k.startswith(prefix) and k not in known)
