"""Keeps the kernel datapath in step with the agent: policy deltas, ipcache, local endpoints.

The thin I/O side of the kernel backend: `compile.py` decides what the maps must hold,
`loader.KernelDatapath` writes them, and this class decides *when* — only the endpoints a
policy delta names are recompiled, one ipcache change writes one prefix, and `flush()` writes
the difference. `resync()` reconciles everything against what the kernel holds (agent start):
nothing is flushed, so enforcement never lapses across a restart.

Also the iptables fallback (`IptablesRedirect`), used when bcc cannot compile: every TCP packet
to a local pod is marked for the proxy, and Envoy makes the L3/L4 verdicts.

Not thread-safe: the agent's reconcile loop owns it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import subprocess
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping

from ..identity.ipcache import IPCacheChange
from ..policy.mapstate import EndpointPolicy, PolicyDelta
from .compile import compile_endpoint
from .loader import DatapathError, KernelDatapath, Rtnl, rtnl

log = logging.getLogger(__name__)

MARK, MARK_MASK = 0x200, 0xF00
REDIRECT_MARK = f"{MARK:#x}/{MARK_MASK:#x}"
ROUTE_TABLE = 2004
RULE_PREF = 100
CHAIN = "L7G-PREROUTING"
_RTN_LOCAL = 2
_RT_SCOPE_HOST = 254
_RTPROT_BOOT = 3  # what `ip route add` sets: the route looks the same as one added by hand


def ensure_policy_routing() -> list[str]:
    """Marked packets are delivered locally (to Envoy's transparent listeners): the rule
    `fwmark 0x200/0xf00 lookup 2004` and the route `local 0.0.0.0/0 dev lo table 2004`, in the
    calling thread's network namespace. Idempotent; returns what it changed."""
    changed: list[str] = []
    with Rtnl() as nl:
        rules = nl.call("listing the IPv4 rules", "get_rules", family=socket.AF_INET)
        if not any(r.get("FRA_TABLE") == ROUTE_TABLE and r.get("FRA_FWMARK") == MARK
                   and r.get("FRA_FWMASK", 0xFFFFFFFF) == MARK_MASK for r in rules):
            added = nl.call(f"adding the rule fwmark {REDIRECT_MARK} lookup {ROUTE_TABLE}", "rule", "add",
                            family=socket.AF_INET, table=ROUTE_TABLE, priority=RULE_PREF, fwmark=MARK,
                            fwmask=MARK_MASK, ok=(errno.EEXIST,))  # EEXIST: added since the listing
            if added is not None:
                changed.append(f"ip rule fwmark {REDIRECT_MARK} lookup {ROUTE_TABLE}")
        # FIELD-NOTES: after a verdict flips from redirect to allow, a node TIME_WAIT socket plus
        # early demux blackholes the forwarded SYN. Per network namespace, so set it here.
        demux = Path("/proc/sys/net/ipv4/ip_early_demux")
        if demux.exists() and demux.read_text().strip() != "0":
            demux.write_text("0\n")
            changed.append("sysctl net.ipv4.ip_early_demux=0")
        routes = nl.call(f"listing routing table {ROUTE_TABLE}", "route", "dump", family=socket.AF_INET,
                         table=ROUTE_TABLE)
        if not any(r["type"] == _RTN_LOCAL and r["dst_len"] == 0 for r in routes):
            nl.call(f"adding the route local 0.0.0.0/0 dev lo table {ROUTE_TABLE}", "route", "replace",
                    family=socket.AF_INET, dst="0.0.0.0/0", type=_RTN_LOCAL, oif=nl.link_index("lo"),
                    table=ROUTE_TABLE, scope=_RT_SCOPE_HOST, proto=_RTPROT_BOOT)
            changed.append(f"ip route local 0.0.0.0/0 dev lo table {ROUTE_TABLE}")
    return changed


def host_interface(pod_ip: str, nl: Rtnl | None = None) -> str:
    """The node-side interface a pod is reached through (its veth), from the routing table.
    `nl`: a socket to reuse (one is opened otherwise)."""
    with rtnl(nl) as rt:
        return rt.route_interface(pod_ip, f"pod {pod_ip}")


def _run(argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise DatapathError(f"{' '.join(argv)}: {out.stderr.strip()}")


class KernelApplier:
    def __init__(self, datapath: KernelDatapath, policy_of: Callable[[int], EndpointPolicy | None],
                 tunnel: bool = False) -> None:
        self.dp = datapath
        self.policy_of = policy_of
        self.tunnel = tunnel  # in-transit encryption on: flag ingress entries that need the tunnel
        self._dirty: set[int] = set()
        self._endpoints: set[int] = set()
        self._attached: dict[str, str] = {}  # pod ip -> interface

    def resync(self, endpoints: Iterable[int], ipcache: Mapping[ipaddress.IPv4Network | ipaddress.IPv6Network, int],
               local_pods: Mapping[str, int]) -> int:
        self._endpoints = set(endpoints)
        changes = self.dp.set_ipcache({n: i for n, i in ipcache.items() if n.version == 4})
        changes += self.set_local_pods(local_pods)
        desired = {}
        for ep in sorted(self._endpoints):
            pol = self.policy_of(ep)
            if pol is not None:
                desired.update(compile_endpoint(pol, self.tunnel))
        changes += self.dp.set_policy(desired)
        self._dirty.clear()
        return changes

    def set_local_pods(self, pods: Mapping[str, int]) -> int:
        v4 = {ip: ident for ip, ident in pods.items() if ipaddress.ip_address(ip).version == 4}
        changes = self.dp.set_endpoints(v4)
        new = [ip for ip in v4 if ip not in self._attached]
        if new:
            with Rtnl() as nl:  # one netlink socket for every pod that appeared
                for ip in new:
                    ifname = host_interface(ip, nl)
                    self.dp.attach(ifname, "pod", nl)
                    self._attached[ip] = ifname
                    log.info("datapath attached to %s (pod %s)", ifname, ip)
        for ip in list(self._attached):
            if ip not in v4:
                self._attached.pop(ip)  # the veth goes away with the pod; nothing to detach
        return changes

    def set_pod_nodes(self, pod_nodes: Mapping[str, str]) -> int:
        return self.dp.set_nodes(pod_nodes)

    def attach_links(self, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            with Rtnl() as nl:
                for name in names:
                    self.dp.attach(name, "link", nl)

    def on_policy_delta(self, delta: PolicyDelta) -> None:
        self._dirty |= set(delta.changes)
        for ep in delta.removed_endpoints:
            self._endpoints.discard(ep)
            self._dirty.add(ep)
        for ep in delta.changes:
            self._endpoints.add(ep)

    def on_ipcache_change(self, change: IPCacheChange) -> None:
        if change.prefix.version != 4:
            return
        if change.new is not None:
            self.dp.upsert_ipcache(change.prefix, change.new)
        else:
            self.dp.delete_ipcache(change.prefix)

    def flush(self) -> int:
        changes = 0
        for ep in sorted(self._dirty):
            pol = self.policy_of(ep) if ep in self._endpoints else None
            changes += self.dp.set_policy(compile_endpoint(pol, self.tunnel) if pol is not None else {}, endpoints=[ep])
        self._dirty.clear()
        return changes


class IptablesRedirect:
    """Fallback redirect without BPF: mark every TCP packet to a local pod for the proxy."""

    def __init__(self) -> None:
        self._pods: tuple[str, ...] = ()

    def set_local_pods(self, pod_ips: Iterable[str]) -> None:
        pods = tuple(sorted(ip for ip in pod_ips if ipaddress.ip_address(ip).version == 4))
        if pods == self._pods:
            return
        lines = ["*mangle", f":{CHAIN} - [0:0]"]
        lines += [f"-A {CHAIN} -p tcp -d {ip}/32 -j MARK --set-xmark {REDIRECT_MARK}" for ip in pods]
        lines.append("COMMIT")
        # One atomic commit: declaring the chain flushes it and its new rules land together, so
        # no packet ever sees an empty chain (which would bypass the proxy).
        out = subprocess.run(["iptables-restore", "--noflush"], input="\n".join(lines) + "\n",
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise DatapathError(f"iptables-restore: {out.stderr.strip()}")
        jump = subprocess.run(["iptables", "-t", "mangle", "-C", "PREROUTING", "-j", CHAIN], capture_output=True, check=False)
        if jump.returncode != 0:
            _run(["iptables", "-t", "mangle", "-I", "PREROUTING", "1", "-j", CHAIN])
        self._pods = pods

    def remove(self) -> None:
        subprocess.run(["iptables", "-t", "mangle", "-D", "PREROUTING", "-j", CHAIN], capture_output=True, check=False)
        subprocess.run(["iptables", "-t", "mangle", "-F", CHAIN], capture_output=True, check=False)
        subprocess.run(["iptables", "-t", "mangle", "-X", CHAIN], capture_output=True, check=False)
