"""The `l7gate` command.

Exit codes follow one rule everywhere: 0 success, 1 the input is invalid (or the verdict could
not be computed from it), 2 usage error (unknown flag, missing file, unknown pod).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__, envoy_names
from .client import AdminClient, AdminError, read_token_file
from .agent.config import DEFAULT_ADMIN, AgentConfig
from .offline.trace import TraceError, TraceRequest, format_trace_text, load_fqdn_cache, run_trace
from .offline.validate import validate_paths
from .k8s.manifests import ENDPOINTS_REFUSED, Manifest, kind_problem, load, object_name
from .k8s.objects import ENDPOINT_KINDS
from .policy.icmp import ICMPTypeError, parse_icmp_type
from .policy.names import label_problem, port_name_problem
from .policy.parse import KIND_CIDR_GROUP, POLICY_INPUT_KINDS, POLICY_KINDS

if TYPE_CHECKING:  # imported by `l7gate agent` alone (the kubernetes client: ~0.35 s)
    from .k8s.watch import FirstPages

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
        "(CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy, cilium.io/v2; NetworkPolicy, "
        "networking.k8s.io/v1).",
    )
    p.add_argument("--version", action="version", version=f"l7gate {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    pol = sub.add_parser(
        "policy",
        help="validate and trace CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy / NetworkPolicy files",
        description="Work with cilium.io/v2 and networking.k8s.io/v1 policy files.",
    )
    psub = pol.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", parser_class=_Parser)
    psub.required = True

    v = psub.add_parser(
        "validate",
        help="check policy files; print errors and warnings as `file: path: message`",
        description="Check CNP/CCNP/NetworkPolicy (and CiliumCIDRGroup) documents in files or folders "
        "(multi-document YAML). "
        "Prints every error and lint warning as `file: resource: path: message`. "
        "Exit 0 when valid (warnings allowed), 1 when any policy is invalid, 2 on usage error.",
    )
    v.add_argument("paths", nargs="+", metavar="PATH", help="YAML/JSON file or folder; - for stdin")
    v.add_argument(
        "--namespace", default="default", type=_namespace_name,
        help="namespace for CNPs and NetworkPolicies without one (default: default)",
    )
    v.add_argument(
        "--cluster-name", default="default", help="local cluster name (default: default)"
    )
    v.add_argument("-o", "--output", choices=("text", "json"), default="text")
    v.add_argument("-q", "--quiet", action="store_true", help="print errors only, no warnings")

    t = psub.add_parser(
        "trace",
        help="explain the verdict for one request between two pods",
        description="Compute the verdict the policies give a connection (and HTTP request), or an "
        "ICMP message (--icmp-type), from "
        "one pod to another, and explain it step by step. PATH holds CNP, CCNP, NetworkPolicy, "
        "CiliumCIDRGroup, Pod, Namespace and Node objects; a Pod's (or Node's) cluster is its `l7gate.io/cluster` "
        "annotation (default: --cluster-name). Pods are named [CLUSTER/]NAMESPACE/POD; `world` stands "
        "for an address outside the cluster; a node's address is that node (its Node's labels, which "
        "fromNodes/toNodes select).",
    )
    t.add_argument(
        "-f", "--file", dest="paths", action="append", required=True, metavar="PATH",
        help="policy/inventory file or folder (repeatable)",
    )
    t.add_argument("--from", dest="src", required=True, metavar="[CLUSTER/]NS/POD|world|ADDRESS",
                   help="a pod, `world`, or an address: a node's (a Node's, or a pod's hostIP) is `host` "
                        "seen from a pod on that node, otherwise the identity of its Node's labels "
                        "(`remote-node` without a Node)")
    t.add_argument("--to", dest="dst", required=True, metavar="[CLUSTER/]NS/POD|world|ADDRESS",
                   help="a pod, `world`, a node's address (as for --from), or an address outside the "
                        "inventory (its CIDR identity; with --fqdn-cache, the toFQDNs selectors of the "
                        "names it was learned for)")
    what = t.add_mutually_exclusive_group(required=True)
    what.add_argument("--port", type=_port_or_name, metavar="N|NAME",
                      help="destination port (TCP, UDP, SCTP): a number, or the name of one of the "
                           "destination pod's container ports")
    what.add_argument("--icmp-type", type=_icmp_type, metavar="TYPE",
                      help="an ICMP message of this type, a number 0-255 or Cilium's name (8 or EchoRequest); "
                           "the protocol is then ICMP")
    t.add_argument("--protocol", type=str.upper, choices=("TCP", "UDP", "SCTP", "ICMP"), default=None,
                   help="default TCP with --port, ICMP with --icmp-type")
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
    t.add_argument("--dns-query", metavar="NAME", help="a DNS query for NAME (to port 53): judged by rules.dns")
    t.add_argument("--sni", metavar="NAME", default=None,
                   help="a TLS connection whose ClientHello names NAME ('' for none): judged by serverNames")
    t.add_argument("--fqdn-cache", metavar="FILE",
                   help="what the DNS proxy learned: {name: [addresses]} or `l7gate fqdn cache list -o json`")
    t.add_argument("--cluster-name", default="default", help="cluster of pods without the annotation")
    t.add_argument("-o", "--output", choices=("text", "json"), default="text")

    admin_flags = _Parser(add_help=False)
    admin_flags.add_argument(
        "--admin", default=os.environ.get("L7GATE_ADMIN", DEFAULT_ADMIN), metavar="ADDRESS",
        help=f"agent admin endpoint, unix:/path or HOST:PORT (env L7GATE_ADMIN; default {DEFAULT_ADMIN})",
    )
    admin_flags.add_argument(
        "--token", default=os.environ.get("L7GATE_ADMIN_TOKEN"),
        help="bearer token for an admin endpoint on TCP (env L7GATE_ADMIN_TOKEN)",
    )
    admin_flags.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS",
        help="how long to wait for the agent's answer (default 30; for an apply, 60 plus 20 ms "
        "per object)",
    )
    admin_flags.add_argument(
        "--token-file", default=os.environ.get("L7GATE_ADMIN_TOKEN_FILE"), metavar="PATH",
        help="read the bearer token from PATH, the agent's admin.tokenFile (env L7GATE_ADMIN_TOKEN_FILE)",
    )

    a = psub.add_parser(
        "apply", parents=[admin_flags], help="apply CNP/CCNP/NetworkPolicy/CiliumCIDRGroup files to a running agent",
        description="Send every CNP/CCNP/NetworkPolicy and CiliumCIDRGroup in PATH to the agent. All or nothing: "
        "if any object is invalid, nothing changes and every error is printed. Other objects are skipped.",
    )
    a.add_argument("-f", "--file", dest="paths", action="append", required=True, metavar="PATH")
    g = psub.add_parser("get", parents=[admin_flags], help="list the policies (and CIDR groups) in force",
                        description="List the policies the agent enforces, and the CiliumCIDRGroups they may name.")
    g.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    d = psub.add_parser(
        "delete", parents=[admin_flags], help="delete policies by name or file",
        description="Delete policies: by KIND/[NAMESPACE/]NAME (e.g. "
        "CiliumNetworkPolicy/payments/allow-web, CiliumCIDRGroup/partners) or every policy and CIDR group "
        "in -f PATH.",
    )
    d.add_argument("names", nargs="*", metavar="KIND/[NS/]NAME")
    d.add_argument("-f", "--file", dest="paths", action="append", default=[], metavar="PATH")

    ep = sub.add_parser("endpoint", help="add, list and remove pods (endpoints) at a running agent",
                        description="Pods and Namespaces the agent knows (until the Kubernetes watch feeds them).")
    esub = ep.add_subparsers(dest="endpoint_command", metavar="SUBCOMMAND", parser_class=_Parser)
    esub.required = True
    ea = esub.add_parser("apply", parents=[admin_flags], help="apply Pod, Namespace, Service, EndpointSlice and Node manifests",
                         description="Send every Pod, Namespace, Service, EndpointSlice and Node in PATH to the agent "
                                     "(all or nothing).")
    ea.add_argument("-f", "--file", dest="paths", action="append", required=True, metavar="PATH")
    el = esub.add_parser("list", parents=[admin_flags], help="list pods with their identities",
                         description="List the pods the agent knows, with identity and addresses.")
    el.add_argument("-o", "--output", choices=("table", "json"), default="table")
    ed = esub.add_parser("delete", parents=[admin_flags], help="remove pods (and EndpointSlices)",
                         description="Remove pods by [CLUSTER/]NAMESPACE/NAME, EndpointSlices by "
                                     "EndpointSlice/[CLUSTER/]NAMESPACE/NAME.")
    ed.add_argument("refs", nargs="+", metavar="[EndpointSlice/][CLUSTER/]NS/NAME")

    nd = sub.add_parser("node", help="list and remove Nodes at a running agent",
                        description="Nodes (applied with `l7gate endpoint apply`): their labels, which "
                                    "fromNodes/toNodes select, their addresses and the identity those have.")
    ndsub = nd.add_subparsers(dest="node_command", metavar="SUBCOMMAND", parser_class=_Parser)
    ndsub.required = True
    ndl = ndsub.add_parser("list", parents=[admin_flags], help="list Nodes with labels, addresses, identity",
                           description="List the Nodes the agent knows: labels, addresses, and the identity of "
                                       "their addresses (host: this node).")
    ndl.add_argument("-o", "--output", choices=("table", "json"), default="table")
    ndd = ndsub.add_parser("delete", parents=[admin_flags], help="remove Nodes",
                           description="Remove Nodes by [CLUSTER/]NAME.")
    ndd.add_argument("refs", nargs="+", metavar="[CLUSTER/]NAME")

    sv = sub.add_parser("service", help="list and remove Services at a running agent",
                        description="Services (applied with `l7gate endpoint apply`), as `cilium service list` "
                                    "shows them: each frontend and its backends.")
    svsub = sv.add_subparsers(dest="service_command", metavar="SUBCOMMAND", parser_class=_Parser)
    svsub.required = True
    svl = svsub.add_parser("list", parents=[admin_flags], help="list Services with frontends and backends",
                           description="List the Services the agent knows, each frontend with its backends.")
    svl.add_argument("-o", "--output", choices=("table", "json"), default="table")
    svd = svsub.add_parser("delete", parents=[admin_flags], help="remove Services",
                           description="Remove Services by [CLUSTER/]NAMESPACE/NAME.")
    svd.add_argument("refs", nargs="+", metavar="[CLUSTER/]NS/NAME")

    fq = sub.add_parser("fqdn", help="what the DNS proxy learned for toFQDNs",
                        description="DNS names and the addresses their answers gave (Cilium's `cilium fqdn cache`).")
    fqsub = fq.add_subparsers(dest="fqdn_command", metavar="SUBCOMMAND", parser_class=_Parser)
    fqsub.required = True
    fqc = fqsub.add_parser("cache", help="the learned names", description="The DNS proxy's cache.")
    fqcsub = fqc.add_subparsers(dest="fqdn_cache_command", metavar="SUBCOMMAND", parser_class=_Parser)
    fqcsub.required = True
    fql = fqcsub.add_parser("list", parents=[admin_flags], help="name, address, TTL left, who looked it up",
                            description="Every learned (name, address): its TTL, the seconds left, the pods that "
                                        "looked it up, and the identity the address has.")
    fql.add_argument("-o", "--output", choices=("table", "json"), default="table")

    x = sub.add_parser("xds", help="inspect what the agent serves to Envoy",
                       description="The xDS state of every connected Envoy.")
    xsub = x.add_subparsers(dest="xds_command", metavar="SUBCOMMAND", parser_class=_Parser)
    xsub.required = True
    xs = xsub.add_parser("status", parents=[admin_flags], help="per Envoy and type: sent, acked, NACKs",
                         description="Like `istioctl proxy-status`: SYNCED, STALE, NACKED or NOT SENT per type.")
    xs.add_argument("-o", "--output", choices=("table", "json"), default="table")
    xd = xsub.add_parser("dump", parents=[admin_flags], help="the resources served, as JSON",
                         description="Dump the xDS resources the agent serves.")
    xd.add_argument("--node", help="node id (default: every node)")
    xd.add_argument("--type", help="resource type: lds, rds, cds, eds, sds or a full type URL")

    au = sub.add_parser("auth", help="mutual authentication between identities",
                        description="Mutual-auth entries the agent holds in the kernel's auth map.")
    ausub = au.add_subparsers(dest="auth_command", metavar="SUBCOMMAND", parser_class=_Parser)
    ausub.required = True
    aus = ausub.add_parser("status", parents=[admin_flags], help="identity pairs, node, expiry, last error",
                           description="List the mutual-auth entries: local and remote identity, the "
                           "remote node, when the entry expires, and the last handshake error.")
    aus.add_argument("-o", "--output", choices=("table", "json"), default="table")

    cm = sub.add_parser("clustermesh", help="the cluster mesh: remote clusters this agent merges",
                        description="Cluster Mesh state, as `cilium clustermesh status` shows it.")
    cmsub = cm.add_subparsers(dest="clustermesh_command", metavar="SUBCOMMAND", parser_class=_Parser)
    cmsub.required = True
    cms = cmsub.add_parser("status", parents=[admin_flags], help="per remote cluster: ready, connected, counts",
                           description="Per remote cluster: ready, configured, connected, its cluster ID, "
                           "nodes, endpoints and identities merged, the last sync, reconnections and the "
                           "last error. Exit 0 when every remote is ready, 1 otherwise.")
    cms.add_argument("-o", "--output", choices=("table", "json"), default="table")
    cms.add_argument("--wait", action="store_true", help="wait until every remote cluster is ready")
    cms.add_argument("--wait-timeout", type=float, default=120.0, metavar="SECONDS",
                     help="how long --wait waits (default 120)")

    st = sub.add_parser("status", parents=[admin_flags], help="the agent's status and datapath",
                        description="Node, cluster, datapath in use, Envoy and xDS state.")
    st.add_argument("-o", "--output", choices=("text", "json"), default="text")

    _add_observe_parser(sub, admin_flags)

    ag = sub.add_parser("agent", help="run the node agent",
                        description="Run the agent: kvstore, policy, identities, xDS server, Envoy, admin endpoint.")
    ag.add_argument("--config", required=True, metavar="FILE", help="agent configuration (YAML)")
    return p


# -- observe (flows) -------------------------------------------------------------------------------

_FILTER_FLAGS = (
    ("--from-pod", "source_pod", "[CLUSTER/]NS/POD", "flows from this pod (POD is a prefix)"),
    ("--to-pod", "destination_pod", "[CLUSTER/]NS/POD", "flows to this pod (POD is a prefix)"),
    ("--pod", "pod", "[CLUSTER/]NS/POD", "flows from or to this pod"),
    ("--namespace", "namespace", "NS", "flows from or to this namespace"),
    ("--from-identity", "source_identity", "ID", "flows from this identity (number or reserved name)"),
    ("--to-identity", "destination_identity", "ID", "flows to this identity"),
    ("--verdict", "verdict", "VERDICT", "FORWARDED, DROPPED, ERROR, AUDIT or REDIRECTED"),
    ("--type", "type", "TYPE", "l7, l3l4 or drop"),
    ("--http-method", "http_method", "METHOD", "HTTP method"),
    ("--http-path", "http_path", "REGEX", "HTTP path regex (RE2, searched)"),
    ("--http-status", "http_status_code", "CODE", "HTTP status: 404, or a prefix: 4+, 40+"),
)


def _add_observe_parser(sub: Any, admin_flags: argparse.ArgumentParser) -> None:
    from .observe.render import FORMATS

    ob = sub.add_parser(
        "observe", parents=[admin_flags], help="show flows: every verdict the agent saw (Hubble-style)",
        description="Show the flows the agent recorded — allowed, denied and failed requests — "
        "like `hubble observe`. Each filter flag may repeat (values OR); different flags AND. "
        "--from-*/--to-* follow the connection: an http-response matches the pods of its "
        "request. Without --last or --since: the last 20 flows (with -f, then every new one).",
    )
    for flag, dest, metavar, text in _FILTER_FLAGS:
        ob.add_argument(flag, dest=f"f_{dest}", action="append", metavar=metavar, help=text)
    ob.add_argument("--since", metavar="DURATION|TIME", help="flows since 5m / 1h30m ago, or an RFC 3339 time")
    ob.add_argument("--last", type=_count, metavar="N", help="the last N matching flows")
    ob.add_argument("-f", "--follow", action="store_true", help="keep printing new flows (Ctrl-C ends)")
    ob.add_argument("-o", "--output", choices=FORMATS, default="text")


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {value!r}")
    return int(value)


_FLOW_LINE = b'{"flow":'


def _cmd_observe(args: argparse.Namespace) -> int:
    from .observe.api import Lost, decode_line, query_path
    from .observe.filters import FilterError, FlowFilter, parse_since
    from .observe.flow import Flow
    from .observe.render import Renderer

    try:
        flt = FlowFilter.parse(**{dest: getattr(args, f"f_{dest}") for _, dest, _, _ in _FILTER_FLAGS})
        if args.since:
            try:
                parse_since(args.since)
            except ValueError as exc:
                raise FilterError([f"--since {args.since!r}: {exc}"]) from None
    except FilterError as exc:
        for e in exc.errors:
            print(f"l7gate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    last = args.last
    if last is None and not args.since:
        last = 20  # Hubble's default for a bare `observe`
    path = query_path(flt, since=args.since, last=last, follow=args.follow)
    client = _client(args)
    render = Renderer(args.output)
    resp = client.open_stream(path)
    out = sys.stdout.buffer
    pending: list[Flow] = []
    rest = b""
    passthrough = args.output == "jsonpb"
    try:
        # Read what the agent sent so far (one chunk per batch of flows), print, flush once.
        while data := resp.read1(65536):
            buf = rest + data if rest else data
            if passthrough:
                cut = buf.rfind(b"\n") + 1
                whole = buf if cut == len(buf) else buf[:cut]
                if whole.count(b"\n") == whole.startswith(_FLOW_LINE) + whole.count(b"\n" + _FLOW_LINE):
                    # Only flow lines, already Hubble's GetFlowsResponse: all of them as they came.
                    out.write(whole)
                    if args.follow:
                        out.flush()
                    rest = buf[cut:]
                    continue
            *lines, rest = buf.split(b"\n")
            flows: list[Flow] = []
            for raw in lines:
                if args.output == "jsonpb" and raw.startswith(_FLOW_LINE):
                    out.write(raw + b"\n")  # already Hubble's GetFlowsResponse: pass it through
                    continue
                item = decode_line(raw)
                if isinstance(item, Lost):
                    print(f"l7gate: {item.count} flow(s) lost: this reader fell behind", file=sys.stderr, flush=True)
                elif item is not None:
                    flows.append(item)
            if args.follow:
                if flows:
                    out.writelines(line.encode() + b"\n" for line in render.lines(flows))
                out.flush()
            else:
                pending.extend(flows)
        if pending:
            out.writelines(line.encode() + b"\n" for line in render.lines(pending))
        out.flush()
    except KeyboardInterrupt:
        return EXIT_OK if args.follow else 130  # Ctrl-C is how a follow ends
    except BrokenPipeError:
        # The reader (`| head`) left: silence the interpreter's own flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        print(f"l7gate: error: the flow stream from {args.admin} broke: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ValueError as exc:
        print(f"l7gate: error: unreadable flow stream from {args.admin}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    finally:
        resp.close()
    if args.follow:
        print("l7gate: the agent ended the flow stream (stopping?)", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _namespace_name(value: str) -> str:
    problem = label_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a namespace name (a DNS-1123 label): {problem}")
    return value


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 1-65535")
    return port


def _icmp_type(value: str) -> int:
    try:
        return parse_icmp_type(value)
    except ICMPTypeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port_or_name(value: str) -> int | str:
    if value.isascii() and value.isdigit():
        return _port(value)
    problem = port_name_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"not a port number or a port name: {value!r} ({problem})")
    return value


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
        if report.skipped_line():
            print(report.skipped_line(), file=sys.stderr)
        print(report.summary(), file=sys.stderr)
    if report.usage_errors:
        return EXIT_USAGE
    return EXIT_INVALID if report.invalid or report.errors else EXIT_OK


def _cmd_trace(args: argparse.Namespace) -> int:
    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            print(f"l7gate: error: --header {h!r}: expected NAME:VALUE", file=sys.stderr)
            return EXIT_USAGE
        headers[name.strip().lower()] = value.strip()
    icmp = args.icmp_type is not None
    protocol = args.protocol or ("ICMP" if icmp else "TCP")
    problem = ""
    if icmp and protocol != "ICMP":
        problem = f"--icmp-type is about ICMP, not --protocol {protocol}"
    elif not icmp and protocol == "ICMP":
        problem = "--protocol ICMP takes --icmp-type TYPE (8 or EchoRequest), not --port"
    elif icmp:
        given = [f for f, v in (("--method", args.method), ("--path", args.path), ("--host", args.host),
                                ("--header", args.header), ("--dns-query", args.dns_query),
                                ("--sni", args.sni is not None)) if v]
        if given:
            problem = f"{', '.join(given)}: an ICMP message has no HTTP request or DNS query"
    if not problem and args.sni is not None:
        given = [f for f, v in (("--method", args.method), ("--path", args.path), ("--host", args.host),
                                ("--header", args.header), ("--dns-query", args.dns_query)) if v]
        if given:
            problem = f"{', '.join(given)}: a TLS connection (--sni) carries no HTTP request or DNS query the proxy reads"
    if problem:
        print(f"l7gate: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    req = TraceRequest(
        paths=tuple(args.paths),
        source=args.src,
        destination=args.dst,
        port=args.icmp_type if icmp else args.port,
        protocol=protocol,
        method=args.method,
        path=args.path,
        host=args.host,
        headers=headers,
        authenticated=args.authenticated,
        cluster_name=args.cluster_name,
        dns_query=args.dns_query,
        tls_sni=args.sni,
    )
    if args.fqdn_cache:
        try:
            with open(args.fqdn_cache, encoding="utf-8") as fh:
                cache = load_fqdn_cache(fh.read())
        except (OSError, ValueError, KeyError) as exc:
            print(f"l7gate: error: --fqdn-cache {args.fqdn_cache}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        req = dataclasses.replace(req, fqdn_cache=cache)
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


def _client(args: argparse.Namespace, default_timeout: float = 30.0) -> AdminClient:
    token = args.token
    if token is None and args.token_file:
        try:
            token = read_token_file(args.token_file)
        except OSError as exc:
            raise _Usage(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
    try:
        return AdminClient(args.admin, token, timeout=args.timeout or default_timeout)
    except ValueError as exc:
        raise _Usage(f"--admin: {exc}") from None


def _load_kinds(paths: list[str], kinds: tuple[str, ...], *, unique: bool = False,
                refuse: Mapping[str, str] | None = None) -> tuple[list[Any], int]:
    """The objects of `kinds` in `paths`, and how many others were skipped. An unknown kind or a
    policy l7gate would not enforce is refused (`kind_problem`), and so is a kind in `refuse`
    (kind → why); with `unique`, so is the same policy twice (the agent would keep one of
    them)."""
    stdin_text = sys.stdin.read() if "-" in paths else None
    manifests, errors = load(paths, stdin_text)
    missing = [e for e in errors if e.missing]
    if missing:
        raise _Usage("; ".join(str(e) for e in missing))
    if errors:
        raise _Invalid("\n".join(str(e) for e in errors))
    refused = [
        f"{m.where}: {object_name(m.obj)}: kind: {problem}"
        for m in manifests
        if (problem := kind_problem(m.obj, kinds)) is not None
    ]
    refused.extend(f"{m.where}: {object_name(m.obj)}: kind: {(refuse or {})[m.kind]}" for m in manifests
                   if m.kind in (refuse or {}))
    if unique:
        refused.extend(_defined_twice([m for m in manifests if m.kind in POLICY_INPUT_KINDS]))
    if refused:
        raise _Invalid("\n".join(refused))
    objs = [m.obj for m in manifests if m.kind in kinds]
    skipped = len(manifests) - len(objs)
    if not objs:
        raise _Invalid(f"no {' or '.join(kinds)} object in {' '.join(paths)}")
    return objs, skipped


def _defined_twice(manifests: list[Manifest]) -> list[str]:
    first: dict[str, str] = {}
    out: list[str] = []
    for m in manifests:
        meta = m.obj.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            continue  # the agent names what is wrong with it
        key = _policy_key(m.obj)
        if key in first:
            out.append(f"{key} is defined twice, at {first[key]} and at {m.where}: one would replace "
                       "the other; remove one, or rename it")
        else:
            first[key] = m.where
    return out


class _Usage(Exception):
    pass


class _Invalid(Exception):
    pass


class _NoAnswer(Exception):
    """A request was sent, and the agent did not answer in time: its outcome is unknown."""


def _print_apply(result: dict[str, list[str]], skipped: int) -> None:
    for verb in ("created", "configured", "unchanged", "deleted"):
        for name in result.get(verb, []):
            print(f"{name} {verb}")
    if skipped:
        print(f"({skipped} other object{'s' if skipped != 1 else ''} skipped)", file=sys.stderr)
    for warning in result.get("warnings", []):  # applied, but not doing what it looks like
        print(f"l7gate: warning: {warning}", file=sys.stderr)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


# An apply of this many objects says what it sends, that it is still waiting, and how long it took.
REPORT_FROM = 100
PROGRESS_EVERY = 10.0  # seconds


def apply_timeout(objects: int) -> float:
    """How long an apply waits for the agent unless --timeout says: generous, so that an apply
    that succeeds is never reported as a failure (the agent takes ~0.5 ms per policy)."""
    return 60.0 + 0.02 * objects


def _send_apply(
    args: argparse.Namespace, objs: list[Any], what: str, send: Callable[[AdminClient, list[Any]], Any],
    check: str,
) -> Any:
    """`send(client, objs)`, telling the user about a long apply: before, while waiting, after.
    `check` is the command that shows whether an apply the CLI gave up on completed."""
    client = _client(args, default_timeout=apply_timeout(len(objs)))
    n = f"{len(objs):,} {what}"
    long = len(objs) >= REPORT_FROM
    done = threading.Event()
    start = time.monotonic()
    if long:
        print(f"applying {n} to the agent at {args.admin}…", file=sys.stderr, flush=True)

        def progress() -> None:
            while not done.wait(PROGRESS_EVERY):
                print(f"still applying {n}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

        threading.Thread(target=progress, name="l7gate-progress", daemon=True).start()
    try:
        result = send(client, objs)
    except TimeoutError:
        # The agent may be working on it still: an apply is all or nothing, but once sent, it
        # completes (or fails) whether or not anyone waits for the answer.
        raise _NoAnswer(
            f"no answer from the agent at {args.admin} within {client.timeout:g} s: the apply of {n} "
            f"may still complete. Check with `{check}` before applying again; --timeout SECONDS waits longer"
        ) from None
    finally:
        done.set()
    if long:
        took = (result.get("timing") or {}) if isinstance(result, dict) else {}
        steps = ", ".join(f"{k} {took[k]:.1f} s" for k in ("check", "persist", "resolve", "publish") if k in took)
        print(f"applied {n} in {time.monotonic() - start:.1f} s" + (f" (agent: {steps})" if steps else ""),
              file=sys.stderr)
    return result


def _cmd_policy_apply(args: argparse.Namespace) -> int:
    objs, skipped = _load_kinds(args.paths, POLICY_INPUT_KINDS, unique=True)
    _print_apply(_send_apply(args, objs, "policies", AdminClient.apply_policies, "l7gate policy get"), skipped)
    return EXIT_OK


def _cmd_policy_get(args: argparse.Namespace) -> int:
    data = _client(args).get("/v1/policy")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    elif args.output == "yaml":
        import yaml

        print(yaml.safe_dump_all([p["object"] for p in data["policies"]], sort_keys=False), end="")
    else:
        rows = []
        for p in data["policies"]:
            spec = p["object"].get("spec") or {}
            if p["object"].get("kind") == KIND_CIDR_GROUP:  # its CIDRs are what it says
                about = ", ".join(str(c) for c in spec.get("externalCIDRs") or ()) or "(no CIDR)"
            else:
                about = str(spec.get("description", ""))
            rows.append([p["key"], about[:60]])
        print(_table(rows, ["POLICY", "DESCRIPTION"]))
        print(f"(revision {data['revision']}, {len(data['endpoints'])} endpoint(s) under policy)", file=sys.stderr)
    return EXIT_OK


def _policy_key(obj: Any) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or "default"
    if obj.get("kind") in (POLICY_KINDS[1], KIND_CIDR_GROUP):
        return f"{obj['kind']}/{meta.get('name')}"
    return f"{obj['kind']}/{ns}/{meta.get('name')}"


def _cmd_policy_delete(args: argparse.Namespace) -> int:
    keys = list(args.names)
    if args.paths:
        objs, _ = _load_kinds(args.paths, POLICY_INPUT_KINDS)
        keys.extend(_policy_key(o) for o in objs)
    if not keys:
        raise _Usage("name a policy (KIND/[NS/]NAME) or give -f PATH")
    return _delete_each(keys, _client(args).delete_policy, "{}")


def _delete_each(names: list[str], delete: Any, shown: str) -> int:
    """Delete every name; a missing one is reported and makes the exit code 1, others go on."""
    rc = EXIT_OK
    for name in names:
        try:
            delete(name)
            print(f"{shown.format(name)} deleted")
        except AdminError as exc:
            if exc.status != 404:
                raise
            print(f"l7gate: {exc}", file=sys.stderr)
            rc = EXIT_INVALID
    return rc


def _cmd_endpoint_apply(args: argparse.Namespace) -> int:
    objs, skipped = _load_kinds(args.paths, ENDPOINT_KINDS, refuse=ENDPOINTS_REFUSED)
    objs.sort(key=lambda o: 0 if o.get("kind") == "Namespace" else 1)
    _print_apply(_send_apply(args, objs, "objects", AdminClient.apply_endpoints, "l7gate endpoint list"), skipped)
    return EXIT_OK


def _cmd_endpoint_list(args: argparse.Namespace) -> int:
    data = _client(args).get("/v1/endpoints")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [
        [e["ref"], str(e["identity"]), ",".join(e["ips"]), "local" if e["local"] else "remote", ",".join(e["ports"])]
        for e in data["endpoints"]
    ]
    print(_table(rows, ["POD", "IDENTITY", "IPS", "WHERE", "PORTS"]))
    return EXIT_OK


def _cmd_endpoint_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    slices = [r[len(_SLICE_PREFIX):] for r in args.refs if r.startswith(_SLICE_PREFIX)]
    pods = [r for r in args.refs if not r.startswith(_SLICE_PREFIX)]
    rc = _delete_each(pods, client.delete_endpoint, "pod/{}") if pods else EXIT_OK
    if slices:
        rc = max(rc, _delete_each(slices, client.delete_endpoint_slice, "endpointslice/{}"))
    return rc


_SLICE_PREFIX = "EndpointSlice/"


def _cmd_node_list(args: argparse.Namespace) -> int:
    data = _client(args).get("/v1/nodes")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [
        [n["node"], ",".join(n["addresses"]) or "-",
         "-" if n["identity"] is None else str(n["identity"]) + (" (host)" if n["local"] else ""),
         ",".join(f"{k}={v}" if v else k for k, v in sorted(n["labels"].items())) or "-"]
        for n in data["nodes"]
    ]
    print(_table(rows, ["NODE", "ADDRESSES", "IDENTITY", "LABELS"]))
    return EXIT_OK


def _cmd_node_delete(args: argparse.Namespace) -> int:
    return _delete_each(list(args.refs), _client(args).delete_node, "node/{}")


def _cmd_service_list(args: argparse.Namespace) -> int:
    data = _client(args).get("/v1/services")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    rows: list[list[str]] = []
    for svc in data["services"]:
        kind = "global" if svc["global"] else "local"
        if svc["global"]:
            kind += f" (shared: {str(svc['shared']).lower()}, affinity: {svc['affinity']})"
        if not svc["frontends"]:
            why = "headless" if svc["cluster_ip"] is None else "no ports"
            rows.append([svc["service"], f"- ({why})", "-", kind])
        for fe in svc["frontends"]:
            backends = ", ".join(f"{b['address']} ({b['pod']})" for b in fe["backends"]) or "none (connections refused)"
            rows.append([svc["service"], fe["frontend"], backends, kind])
    print(_table(rows, ["SERVICE", "FRONTEND", "BACKENDS", "TYPE"]))
    print(f"ClusterIPs on this node: {data['datapath']}", file=sys.stderr)
    if data.get("error"):
        print(f"l7gate: the socket load balancer refused the last change: {data['error']}", file=sys.stderr)
    return EXIT_OK


def _cmd_fqdn_cache_list(args: argparse.Namespace) -> int:
    data = _client(args).get("/v1/fqdn/cache")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [[e["name"], e["ip"], str(e["ttl"]), f"{e['expires_in']:.0f}s", ", ".join(e["sources"]) or "-",
             str(e["identity"]) if e["identity"] is not None else "- (no toFQDNs selector)"] for e in data["entries"]]
    print(_table(rows, ["NAME", "IP", "TTL", "EXPIRES IN", "LOOKED UP BY", "IDENTITY"]))
    if data.get("dns_proxy") is None:
        print("no DNS proxy on this node (kernel mode with dns.proxy: true runs one)", file=sys.stderr)
    return EXIT_OK


def _cmd_service_delete(args: argparse.Namespace) -> int:
    return _delete_each(list(args.refs), _client(args).delete_service, "service/{}")


def _cmd_xds_status(args: argparse.Namespace) -> int:
    data = _client(args).get("/v1/xds/status")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    rows = []
    for r in [t for n in data.get("nodes", []) for t in n["types"].values()]:
        nack = r.get("last_nack") or {}
        rows.append([
            r["node_id"], r["type"], "yes" if r["connected"] else "no", r["state"],
            r.get("cache_version") or "-", r.get("sent_version") or "-", r.get("acked_version") or "-",
            str(r.get("resources", 0)), (nack.get("error") or "")[:80],
        ])
    print(_table(rows, ["NODE", "TYPE", "CONNECTED", "STATE", "SERVING", "SENT", "ACKED", "RESOURCES", "LAST NACK"]))
    if not rows:
        print("no Envoy has subscribed to this agent (with proxy.engine h11 there is none: `l7gate status` shows "
              "the engine)", file=sys.stderr)
    return EXIT_OK


_TYPE_ALIASES = {short.lower(): url for url, short in envoy_names.SHORT_NAMES.items()}


def _cmd_xds_dump(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    q: dict[str, str] = {}
    if args.node:
        q["node"] = args.node
    if args.type:
        t = _TYPE_ALIASES.get(args.type.lower(), args.type)
        if "/" not in t:
            raise _Usage(f"--type {args.type!r}: expected one of {', '.join(_TYPE_ALIASES)} or a type URL")
        q["type"] = t
    path = "/v1/xds/config" + ("?" + urlencode(q) if q else "")
    print(json.dumps(_client(args).get(path), indent=2, sort_keys=True))
    return EXIT_OK


def _cmd_auth_status(args: argparse.Namespace) -> int:
    import datetime as _dt

    data = _client(args).get("/v1/auth")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    if not data.get("enabled"):
        print("mutual authentication is not enabled on this agent (mtls.enabled)", file=sys.stderr)
    def when(t: Any) -> str:
        if not t:
            return "-"
        return _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [
        [str(e["local"]), str(e["remote"]), str(e.get("node") or "-"), when(e.get("expires_at")),
         str(e.get("attempts", 0)), (e.get("last_error") or "")[:70]]
        for e in data.get("entries", [])
    ]
    print(_table(rows, ["LOCAL", "REMOTE", "NODE", "EXPIRES", "HANDSHAKES", "LAST ERROR"]))
    tunnel = data.get("tunnel")
    if data.get("enabled"):
        print()
        if not tunnel:
            print("encryption in transit: off (mtls.encryption: none)")
            return EXIT_OK
        print(f"encryption in transit: mTLS tunnel on {tunnel['listen']} "
              f"(trust domain {tunnel['trust_domain']})"
              + (f"; ERROR: {tunnel['error']}" if tunnel.get("error") else ""))
        ing = ", ".join(e["endpoint"] for e in tunnel.get("ingress", [])) or "-"
        print(f"accepting tunnelled requests only, for: {ing}")
        trows = [
            [e["destination"], str(e["identity"]), e["node"], ",".join(str(x) for x in e["sources"]),
             "yes" if e["ready"] else "no"]
            for e in tunnel.get("egress", [])
        ]
        print(_table(trows, ["TUNNELLED DESTINATION", "IDENTITY", "VIA", "SOURCES", "READY"]))
    return EXIT_OK


def _cmd_clustermesh_status(args: argparse.Namespace) -> int:

    client = _client(args)
    deadline = time.monotonic() + args.wait_timeout
    data = client.get("/v1/clustermesh")
    while args.wait and data.get("enabled") and not data.get("ready") and time.monotonic() < deadline:
        time.sleep(0.5)
        data = client.get("/v1/clustermesh")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK if data.get("ready", not data.get("enabled")) else EXIT_INVALID
    if not data.get("enabled"):
        print("cluster mesh: not enabled on this agent (clustermesh.etcd in its configuration)")
        return EXIT_OK
    remotes = data.get("remotes", [])
    ready = sum(1 for r in remotes if r["ready"])
    cl = data["cluster"]
    mark = "✅" if data.get("ready") else "❌"
    print(f"{mark} cluster {cl['name']} (id {cl['id']}): {ready}/{len(remotes)} remote clusters ready")
    pub = data.get("publishing") or {}
    if pub:
        print(f"   this node publishes {pub['endpoints']} endpoint(s) and {len(pub.get('services', []))} global "
              f"service(s) to its cluster's etcd ({pub['pending']} pending; synced: "
              f"{', '.join(pub['synced']) or 'not yet'})")
        if pub.get("services_error"):
            print(f"   global services not published: {pub['services_error']}")
    for err in data.get("config_errors", []):
        print(f"   configuration: {err}")
    now = time.time()
    rows = [
        [r["name"], "yes" if r["ready"] else "no", "yes" if r["configured"] else "no",
         "yes" if r["connected"] else "no", str(r["cluster_id"] or "-"), str(r["nodes"]), str(r["endpoints"]),
         str(r["identities"]), f"{now - r['last_sync']:.0f}s ago" if r.get("last_sync") else "never",
         str(r["reconnections"]), (r.get("last_error") or "")[:70]]
        for r in remotes
    ]
    print(_table(rows, ["REMOTE", "READY", "CONFIGURED", "CONNECTED", "ID", "NODES", "ENDPOINTS", "IDENTITIES",
                        "LAST SYNC", "RECONNECTS", "LAST ERROR"]))
    services = [[r["name"], s["service"], ", ".join(s["frontends"]) or "-", str(s["backends"]), s["here"]]
                for r in remotes for s in r.get("global_services", [])]
    if services:
        print()
        print(_table(services, ["REMOTE", "GLOBAL SERVICE", "FRONTENDS THERE", "BACKENDS", "HERE"]))
    for problem in data.get("service_problems", []):
        print(f"⚠️  {problem}")
    return EXIT_OK if data.get("ready") else EXIT_INVALID


def _cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when the agent is healthy, 1 when what is enforced is not what it wants."""
    data = _client(args).get("/v1/status")
    health = data.get("health") or {"healthy": True, "problems": []}
    rc = EXIT_OK if health.get("healthy", True) else EXIT_INVALID
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return rc
    if rc != EXIT_OK:
        print("UNHEALTHY: " + "; ".join(health.get("problems", [])))
    else:
        print("healthy")
    datapath = data.get("datapath") or {}
    if datapath.get("secure") is False:
        print(f"WARNING: datapath {datapath.get('mode')} is not a secure mode: {datapath.get('description', '')}")
    for k in sorted(data):
        if k == "health":
            continue
        v = data[k]
        print(f"{k + ':':<14} {json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}")
    return rc


def _cmd_agent(args: argparse.Namespace) -> int:
    from .agent.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for e in exc.errors:
            print(f"{args.config}: {e}", file=sys.stderr)
        return EXIT_INVALID
    first_pages = _ask_first_pages(config)
    from .agent.daemon import run_agent  # ~0.5 s of imports, while the API server answers

    return run_agent(config, first_pages=first_pages)


def _ask_first_pages(config: AgentConfig) -> FirstPages | None:
    """With `kubernetes.enabled`: the first page of every resource's listing, asked for now
    (`k8s.watch.FirstPages`). None without a usable client configuration: the agent's start
    then stops with what is wrong with it."""
    if not config.kubernetes.enabled:
        return None
    from .k8s.watch import ApiConnection, FirstPages, KubeConfigError, load_configuration

    try:
        return FirstPages(ApiConnection(load_configuration(config.kubernetes.kubeconfig)))
    except KubeConfigError:
        return None


_COMMANDS = {
    ("policy", "apply"): _cmd_policy_apply,
    ("policy", "get"): _cmd_policy_get,
    ("policy", "delete"): _cmd_policy_delete,
    ("endpoint", "apply"): _cmd_endpoint_apply,
    ("endpoint", "list"): _cmd_endpoint_list,
    ("endpoint", "delete"): _cmd_endpoint_delete,
    ("node", "list"): _cmd_node_list,
    ("node", "delete"): _cmd_node_delete,
    ("service", "list"): _cmd_service_list,
    ("fqdn", "cache"): _cmd_fqdn_cache_list,
    ("service", "delete"): _cmd_service_delete,
    ("xds", "status"): _cmd_xds_status,
    ("xds", "dump"): _cmd_xds_dump,
    ("status", None): _cmd_status,
    ("auth", "status"): _cmd_auth_status,
    ("clustermesh", "status"): _cmd_clustermesh_status,
    ("observe", None): _cmd_observe,
    ("agent", None): _cmd_agent,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "policy" and args.policy_command == "validate":
            return _cmd_validate(args)
        if args.command == "policy" and args.policy_command == "trace":
            return _cmd_trace(args)
        sub = getattr(args, f"{args.command}_command", None)
        fn = _COMMANDS.get((args.command, sub))
        if fn is not None:
            return fn(args)
    except _Usage as exc:
        print(f"l7gate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _Invalid as exc:
        print(f"l7gate: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except _NoAnswer as exc:
        print(f"l7gate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE  # as for any agent that does not answer in time
    except AdminError as exc:
        hint = ""
        if exc.status == 401:
            hint = "\n(give the token with --token-file PATH, the agent's admin.tokenFile, or $L7GATE_ADMIN_TOKEN_FILE)"
        print(f"l7gate: the agent refused the request ({exc.status}):\n{exc}{hint}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:
        return EXIT_OK
    except PermissionError:
        print(f"l7gate: error: permission denied on the agent's admin socket {args.admin}: it is open to root "
              "(and to the group in the agent's admin.group) only; run as root, e.g. with sudo", file=sys.stderr)
        return EXIT_USAGE
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        print(f"l7gate: error: cannot reach the agent at {args.admin}: {exc.strerror or exc} "
              "(is `l7gate agent` running? --admin or $L7GATE_ADMIN says where its admin API is)", file=sys.stderr)
        return EXIT_USAGE
    except TimeoutError:
        print(f"l7gate: error: the agent at {args.admin} did not answer in time; it may be busy (see its log) "
              "— try again", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, http.client.HTTPException) as exc:
        print(f"l7gate: error: talking to the agent at {args.admin} failed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
