"""The ``fastpunch`` command. Errors become one line on stderr and an exit
code; a traceback only with --debug."""

from __future__ import annotations

import argparse
import json
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpunch", description=__doc__,
                                     formatter_class=DefaultsHelpFormatter)
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

    from fastpunch.lab.cli import add_subparser as add_lab

    add_lab(sub)

    from fastpunch.ccs.cli import add_subparsers as add_ccs

    add_ccs(sub)

    from fastpunch.tools import add_subparsers as add_tools

    add_tools(sub)

    from fastpunch.camera import add_subparser as add_camera

    add_camera(sub)

    from fastpunch.agent.cli import add_subparsers as add_agent

    add_agent(sub)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_cmd_version)
    _show_defaults(parser)
    return parser


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it already names
    one (or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """The formatter above on every subcommand's parser, however deep."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
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
