"""The `l7gate` command.

Exit codes follow one rule everywhere: 0 success, 1 the input is invalid (or the verdict could
not be computed from it), 2 usage error (unknown flag, missing file, unknown pod).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .agent.trace import TraceError, TraceRequest, format_trace_text, run_trace
from .agent.validate import validate_paths

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with our exit code for usage errors and a hint to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="l7gate",
        description="Sidecarless, identity-based L7 policy enforcement for Kubernetes "
        "(CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy, cilium.io/v2).",
    )
    p.add_argument("--version", action="version", version=f"l7gate {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    pol = sub.add_parser(
        "policy",
        help="validate and trace CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy files",
        description="Work with cilium.io/v2 policy files.",
    )
    psub = pol.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", parser_class=_Parser)
    psub.required = True

    v = psub.add_parser(
        "validate",
        help="check policy files; print errors and warnings as `file: path: message`",
        description="Check CNP/CCNP documents in files or folders (multi-document YAML). "
        "Prints every error and lint warning as `file: resource: path: message`. "
        "Exit 0 when valid (warnings allowed), 1 when any policy is invalid, 2 on usage error.",
    )
    v.add_argument("paths", nargs="+", metavar="PATH", help="YAML/JSON file or folder; - for stdin")
    v.add_argument(
        "--namespace", default="default", help="namespace for CNPs without one (default: default)"
    )
    v.add_argument(
        "--cluster-name", default="default", help="local cluster name (default: default)"
    )
    v.add_argument("-o", "--output", choices=("text", "json"), default="text")
    v.add_argument("-q", "--quiet", action="store_true", help="print errors only, no warnings")

    t = psub.add_parser(
        "trace",
        help="explain the verdict for one request between two pods",
        description="Compute the verdict the policies give a connection (and HTTP request) from "
        "one pod to another, and explain it step by step. PATH holds CNP, CCNP, Pod and "
        "Namespace objects; a Pod's cluster is its `l7gate.io/cluster` annotation "
        "(default: --cluster-name). Pods are named [CLUSTER/]NAMESPACE/POD; `world` stands "
        "for an address outside the cluster.",
    )
    t.add_argument(
        "-f", "--file", dest="paths", action="append", required=True, metavar="PATH",
        help="policy/inventory file or folder (repeatable)",
    )
    t.add_argument("--from", dest="src", required=True, metavar="[CLUSTER/]NS/POD")
    t.add_argument("--to", dest="dst", required=True, metavar="[CLUSTER/]NS/POD")
    t.add_argument("--port", type=_port, required=True, metavar="N")
    t.add_argument("--protocol", type=str.upper, choices=("TCP", "UDP", "SCTP"), default="TCP")
    t.add_argument("--method", help="HTTP method (default GET when the port has HTTP rules)")
    t.add_argument("--path", help="HTTP :path, query included (default /)")
    t.add_argument("--host", help="HTTP :authority")
    t.add_argument(
        "--header", action="append", default=[], metavar="K:V", help="HTTP header (repeatable)"
    )
    t.add_argument(
        "--authenticated", action="store_true",
        help="assume a valid mutual-auth entry exists for the identity pair",
    )
    t.add_argument("--cluster-name", default="default", help="cluster of pods without the annotation")
    t.add_argument("-o", "--output", choices=("text", "json"), default="text")
    return p


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 1-65535")
    return port


def _cmd_validate(args: argparse.Namespace) -> int:
    stdin_text = sys.stdin.read() if "-" in args.paths else None
    report = validate_paths(
        args.paths, default_namespace=args.namespace, cluster_name=args.cluster_name,
        stdin_text=stdin_text,
    )
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        for line in report.lines(include_warnings=not args.quiet):
            print(line)
        print(report.summary(), file=sys.stderr)
    if report.usage_errors:
        return EXIT_USAGE
    return EXIT_INVALID if report.invalid else EXIT_OK


def _cmd_trace(args: argparse.Namespace) -> int:
    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            print(f"l7gate: error: --header {h!r}: expected NAME:VALUE", file=sys.stderr)
            return EXIT_USAGE
        headers[name.strip().lower()] = value.strip()
    req = TraceRequest(
        paths=tuple(args.paths),
        source=args.src,
        destination=args.dst,
        port=args.port,
        protocol=args.protocol,
        method=args.method,
        path=args.path,
        host=args.host,
        headers=headers,
        authenticated=args.authenticated,
        cluster_name=args.cluster_name,
    )
    try:
        result = run_trace(req)
    except TraceError as exc:
        print(f"l7gate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        print(format_trace_text(result))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "policy" and args.policy_command == "validate":
            return _cmd_validate(args)
        if args.command == "policy" and args.policy_command == "trace":
            return _cmd_trace(args)
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
