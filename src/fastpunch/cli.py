"""The ``fastpunch`` command. Errors become one line on stderr and an exit
code; a traceback only with --debug."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Optional, Sequence

from fastpunch import __version__
from fastpunch.errors import FastpunchError, InsufficientPrivilegeError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PRIVILEGE = 77  # sysexits EX_NOPERM
# what a command may need beyond a device install, and the extra that brings it
# (pyroute2 is not here: fastpunch._netns names the lab extra itself)
EXTRA_OF = {"cryptography": "ccs", "prometheus_client": "ccs", "redis": "redis"}


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.engine:
        from fastpunch import demo

        report = demo.run()
    else:
        from fastpunch import labdemo

        report = labdemo.run(a=args.a, b=args.b, seconds=args.seconds)
    if args.json:
        print(json.dumps(report))
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"fastpunch {__version__}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fastpunch import _netns, netfilter

    from fastpunch import lab

    from fastpunch.errors import KernelFeatureMissing

    try:
        tables = netfilter.sweep_stale()
    except KernelFeatureMissing as exc:      # (no nf_tables: no tables to sweep; namespaces still)
        print(f"no nftables tables swept: {exc.strerror}", file=sys.stderr)
        tables = []
    spaces = _netns.sweep_stale() + lab.sweep_stale()
    print(f"removed {len(tables)} stale nftables tables, {len(spaces)} stale namespaces")
    return 0


#: (commands, the module that registers them, its function): each module
#: is imported only when one of its commands is asked for (or for --help, an
#: unknown command, no command), so `fastpunch device run` on a gateway
#: does not carry the server's key store, the lab or the camera in memory
COMMANDS = (
    (("lab",), "fastpunch.lab.cli", "add_subparser"),
    (("ccs",), "fastpunch.ccs.cli", "add_ccs_subparser"),
    (("device",), "fastpunch.ccs.cli", "add_device_subparser"),
    (("natcheck", "connect", "send", "recv", "exec"), "fastpunch.tools", "add_subparsers"),
    (("camera",), "fastpunch.tools", "add_camera_subparser"),
    (("agent", "forward"), "fastpunch.agent.cli", "add_subparsers"),
)


def _command_in(argv: Optional[Sequence[str]]) -> Optional[str]:
    """The command word of ``argv`` (the top level's options take no value),
    None if there is none."""
    for word in argv or ():
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser for ``argv``'s command (every command's without argv, or
    when it names none it knows)."""
    parser = _Parser(prog="fastpunch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastpunch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="camera and viewer behind two NATs connect directly, in a lab")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.add_argument("--engine", action="store_true",
                   help="the engine demo instead: a crafted handshake with a real kernel")
    p.add_argument("--a", default="nat", help="the camera's gateway profile (default nat)")
    p.add_argument("--b", default="nat", help="the viewer's gateway profile (default nat)")
    p.add_argument("--seconds", type=int, default=10, help="seconds of video to receive")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("sweep", help="remove tables and namespaces left by crashed processes")
    p.set_defaults(func=_cmd_sweep)

    asked = _command_in(argv)
    wanted = [entry for entry in COMMANDS if asked in entry[0]] or COMMANDS
    for _names, module, function in wanted:
        getattr(importlib.import_module(module), function)(sub)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_cmd_version)
    _show_defaults(parser)
    return parser


def _columns() -> int:
    """What argparse asks shutil.get_terminal_size for (COLUMNS, else the
    terminal's width, else 80, a value of 0 or less skipped as shutil does),
    without importing shutil (and with it bz2 and lzma: 0.8 MB of a
    gateway's idle agent): argparse makes a formatter for every
    add_argument, not only for --help."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
        if columns > 0:
            return columns
    except ValueError:
        pass
    try:
        columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        if columns > 0:
            return columns
    except (AttributeError, ValueError, OSError):
        pass
    return 80


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it already names
    one (or there is none to show)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None) -> None:
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every parser of the command, subcommands' too (add_subparsers makes
    them of the parent's class), formats with DefaultsHelpFormatter from
    the start."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """The formatter above on every subcommand's parser, however deep."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InsufficientPrivilegeError as exc:
        if args.debug:
            raise
        print(f"fastpunch: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PRIVILEGE
    except (FastpunchError, OSError) as exc:
        if args.debug:
            raise
        print(f"fastpunch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None or args.debug:
            raise
        print(f"fastpunch: {args.command} needs {exc.name.split('.')[0]}, which a device "
              f"install leaves out: pip install 'fastpunch[{extra}]'", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
