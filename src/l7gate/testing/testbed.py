"""The single-machine testbed: nodes and pods as network namespaces joined by veth pairs.

Theory of operation
-------------------
A `Testbed` is one run, named by a short random run id (4 hex digits). Everything it creates
carries that id, so parallel and stale runs never collide:

- a node is a netns ``l7g-<run>-<node>``; a pod is a netns ``l7g-<run>-<pod>``;
- a pod's veth is ``eth0`` in the pod and ``l7g<run>p<n>`` in its node (Cilium's ``lxc*``);
- a link between two nodes is a veth pair ``l7g<run>n<peer index>`` in each node, named after
  the node it leads to.

Interface names are checked to fit IFNAMSIZ (15 characters). Every veth is created directly
inside its namespaces (a netlink request in the node whose peer goes to the pod's netns, as
``ip -n NODE link add ... peer ... netns POD``): nothing is ever created, addressed or routed in
the root network namespace, and no route leads out of the testbed.

Namespaces, links, addresses and routes are set up over netlink with pyroute2, from a socket
opened inside the namespace it configures (`_Netlink`); a netlink error is a `TestbedError`
naming the namespace, the operation and the errno. Programs run inside a namespace (curl,
servers, agents) are subprocesses: ``ip netns exec`` or ``nsenter --net``.

Addressing and routing (IPv4 only; IPv6 is disabled in every testbed namespace, so no
router solicitations or DAD show up as unexpected packets at the BPF hooks):

- A node owns ``node_cidr`` (e.g. ``10.0.1.0/24``). Its node IP is the first host of that CIDR
  (``10.0.1.1``), a /32 on the node's ``lo`` — the role of Cilium's ``cilium_host`` router IP.
  Pods get /32 addresses from the same CIDR, from ``.10`` upwards unless one is given.
- In a pod: ``<ip>/32 dev eth0``, ``<node_ip> dev eth0 scope link``, ``default via <node_ip>``.
- In the node: ``<pod_ip>/32 dev l7g<run>p<n>``. The host-side veth has no address at all: the
  node answers the pod's ARP for the node IP because the IP is local to the node and
  ``arp_ignore=0`` (weak host model), which the testbed sets explicitly since a new netns inherits
  ``conf/all`` and ``conf/default`` from the root namespace. Neither a per-veth copy of the node IP
  nor proxy_arp is needed.
- A link between nodes A and B: in A, ``<B node_ip>/32 dev <link> scope link`` and
  ``<B node_cidr> via <B node_ip> dev <link>``, and the mirror image in B, so pod-to-pod
  traffic is forwarded by both nodes and really crosses the link.
- Node sysctls: ``ip_forward=1``, ``rp_filter=0`` (all, default), ``ip_early_demux=0`` (a TIME_WAIT
  socket plus early demux blackholes forwarded SYNs after a redirect→allow flip, FIELD-NOTES),
  ``arp_ignore=0`` and ``arp_filter=0`` (all, default).

Clean-up
--------
Teardown (``__exit__``, also when the body raised) terminates every process the testbed spawned,
by PID, then any process still inside one of its namespaces (as ``ip netns pids`` finds them,
e.g. an Envoy whose agent was ``kill -9``-ed), then deletes the namespaces; their veths go with
them. A live run holds an exclusive ``flock`` on ``/run/l7g-testbed/<run>.lock``; a run whose
lock is free has crashed. `cleanup_all` removes what crashed runs left behind, and `Testbed`
calls it at start for testbed-named namespaces.

A `Testbed` and its `Node`/`Pod` handles are not thread-safe: one thread builds and tears down.
Commands may run from any thread. `Netns.entered()` switches only the calling thread.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pyroute2 import IPRoute, NetlinkError  # type: ignore[import-untyped]
from pyroute2 import netns as pyroute2_netns

from l7gate.k8s.objects import CLUSTER_ANNOTATION

log = logging.getLogger(__name__)

PREFIX = "l7g"
IFNAMSIZ = 15  # usable characters; the kernel's IFNAMSIZ of 16 includes the NUL
LOCK_DIR = Path("/run/l7g-testbed")
NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NAME` bind-mounts /etc/netns/NAME/* over /etc/*
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")  # cgroup v2 on this machine (FIELD-NOTES)
CLUSTER_DOMAIN = "cluster.local"
POD_SERVER = Path(__file__).resolve().parents[3] / "scripts" / "pod_server.py"
FIRST_POD_OFFSET = 10  # pods get <cidr>.10, .11, ... unless an address is given

_TESTBED_NETNS = re.compile(r"l7g-([0-9a-f]{4})-.+")
_CLONE_NEWNET = 0x40000000
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")

_RT_SCOPE_LINK = 253
_RTPROT_BOOT = 3  # what `ip route add` sets: routes look as they did when set up with `ip`

_libc = ctypes.CDLL(None, use_errno=True)

_NODE_SYSCTLS = (
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv4/conf/lo/rp_filter", "0"),
    ("net/ipv4/ip_early_demux", "0"),
    ("net/ipv4/conf/all/arp_ignore", "0"),
    ("net/ipv4/conf/default/arp_ignore", "0"),
    ("net/ipv4/conf/all/arp_filter", "0"),
    ("net/ipv4/conf/default/arp_filter", "0"),
    ("net/ipv6/conf/all/disable_ipv6", "1"),
    ("net/ipv6/conf/default/disable_ipv6", "1"),
)
_POD_SYSCTLS = (
    ("net/ipv6/conf/all/disable_ipv6", "1"),
    ("net/ipv6/conf/default/disable_ipv6", "1"),
)


class TestbedError(RuntimeError):
    """A testbed operation failed; the message names the namespace and the operation, and
    includes the errno or the command's output."""

    __test__ = False  # not a pytest test class


# --- small helpers ---------------------------------------------------------------------------


class _Netlink:
    """pyroute2 requests in one network namespace (None: the calling thread's). The socket is
    opened with the calling thread switched into `netns` by setns() — a netlink socket belongs
    to the namespace it was created in — rather than with ``IPRoute(netns=...)``, which forks
    the whole (large) test process for each socket. Used by the thread that opened it, then
    closed. A `NetlinkError` becomes a `TestbedError` naming the namespace and the operation."""

    def __init__(self, netns: str | None) -> None:
        self.where = netns or "the current namespace"
        try:
            if netns is None:
                self.ipr: Any = IPRoute(groups=0)  # requests only: no multicast events
            else:
                with netns_entered(netns):
                    self.ipr = IPRoute(groups=0)
        except (OSError, NetlinkError) as exc:
            raise TestbedError(f"netlink socket in {self.where}: {exc}") from None

    def __enter__(self) -> _Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ipr.close()

    def __call__(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.ipr, method)(*args, **kwargs)
        except NetlinkError as exc:
            raise TestbedError(f"{self.where}: {what}: {os.strerror(exc.code)}") from None

    def index(self, ifname: str) -> int:
        return int(self(f"interface {ifname}", "link", "get", ifname=ifname)[0]["index"])

    def up(self, ifname: str) -> int:
        """Set `ifname` up; returns its index."""
        index = self.index(ifname)
        self(f"setting {ifname} up", "link", "set", index=index, state="up")
        return index

    def add_address(self, index: int, ifname: str, ip: str) -> None:
        self(f"adding {ip}/32 to {ifname}", "addr", "add", index=index, address=ip, prefixlen=32)

    def add_route(self, dst: str, index: int, ifname: str, via: str | None = None) -> None:
        """`dst` dev `ifname` (scope link), or `dst` via `via` dev `ifname`, as ``ip route add``."""
        if via is None:
            self(f"adding route {dst} dev {ifname} scope link", "route", "add", dst=dst, oif=index,
                 scope=_RT_SCOPE_LINK, proto=_RTPROT_BOOT)
        else:
            self(f"adding route {dst} via {via} dev {ifname}", "route", "add", dst=dst, gateway=via,
                 oif=index, proto=_RTPROT_BOOT)

    def add_veth(self, ifname: str, peer: str, peer_netns: str) -> None:
        """A veth pair `ifname` (here) — `peer` (in `peer_netns`), created in one request."""
        with open(NETNS_DIR / peer_netns) as target:
            self(f"adding veth {ifname} (peer {peer} in {peer_netns})", "link", "add", ifname=ifname,
                 kind="veth", peer={"ifname": peer, "net_ns_fd": target.fileno()})


def _ifname(*parts: str) -> str:
    name = PREFIX + "".join(parts)
    if len(name) > IFNAMSIZ:
        raise TestbedError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    return name


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def netns_entered(netns: str) -> Iterator[None]:
    """Run the body with the calling thread in `netns` (sockets created there stay there)."""
    with open(NETNS_DIR / netns) as target, open("/proc/thread-self/ns/net") as home:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def _write_sysctls(netns: str, values: Sequence[tuple[str, str]]) -> None:
    # /proc/sys/net resolves against the calling thread's netns.
    with netns_entered(netns):
        for key, value in values:
            Path("/proc/sys", key).write_text(value)


def _clean_env(env: Mapping[str, str] | None) -> dict[str, str]:
    base = dict(os.environ if env is None else env)
    for var in _PROXY_VARS:
        base.pop(var, None)
        base.pop(var.upper(), None)
    return base


def _in_cgroup(cgroup: str | Path | None, argv: Sequence[str]) -> list[str]:
    """`argv`, started inside cgroup v2 directory `cgroup` (when given) — e.g. so that the
    kernel datapath's sockops program sees its sockets."""
    if cgroup is None:
        return list(argv)
    return ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *argv]


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _create_netns(netns: str) -> None:
    """A named network namespace, as ``ip netns add``: pyroute2 bind-mounts at /run/netns/<name>
    the namespace of a short-lived thread that unshared its own. (pyroute2's `netns.create`
    does the same in a forked child: a fork of the whole test process, 14 ms at 300 MB.)"""
    failed: list[BaseException] = []

    def unshare_and_mount() -> None:
        try:
            if _libc.unshare(_CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare: {os.strerror(err)}")
            pyroute2_netns.attach(netns, threading.get_native_id())
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=unshare_and_mount, name="l7g-netns-add")
    thread.start()
    thread.join()
    if failed:
        raise TestbedError(f"creating netns {netns}: {failed[0]}")


def _netns_pids(netns: str) -> list[int]:
    """Processes whose network namespace is `netns` (``ip netns pids``)."""
    try:
        return sorted(pyroute2_netns.ns_pids(str(NETNS_DIR)).get(netns, []))
    except OSError as exc:
        log.warning("netns %s: cannot list its processes: %s", netns, exc)
        return []


def _root_l7g_links() -> list[str]:
    with _Netlink(None) as nl:
        names = [str(link.get("IFLA_IFNAME")) for link in nl("listing links", "get_links")]
    return sorted(name for name in names if name.startswith(PREFIX))


def _end_processes(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM the given PIDs, then SIGKILL whatever still runs after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = [p for p in alive if _running(p)]
        if not alive:
            return
        pids = alive


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _delete_netns(netns: str) -> None:
    """End the processes still inside `netns`, then remove it (``ip netns delete``); its veths
    go with it. Already gone is fine."""
    pids = _netns_pids(netns)
    if pids:
        log.warning("netns %s: ending leftover processes %s", netns, pids)
        _end_processes(pids)
    try:
        pyroute2_netns.remove(netns)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TestbedError(f"deleting netns {netns}: {exc}") from None


def _run_is_live(run: str) -> bool:
    """True if a testbed run with this id holds its lock (the run is in progress)."""
    try:
        fd = os.open(LOCK_DIR / f"{run}.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def select_leftovers(netns_names: Sequence[str], root_links: Sequence[str],
                     is_live: Callable[[str], bool], *, testbed_names_only: bool
                     ) -> tuple[list[str], list[str]]:
    """Which namespaces and root-namespace interfaces `cleanup_all` removes (see there)."""
    namespaces = []
    for netns in netns_names:
        if not netns.startswith(PREFIX):
            continue
        match = _TESTBED_NETNS.fullmatch(netns)
        if match is None and testbed_names_only:
            continue
        if match is not None and is_live(match.group(1)):
            continue
        namespaces.append(netns)
    links = [] if testbed_names_only else [name for name in root_links if name.startswith(PREFIX)]
    return namespaces, links


def cleanup_all(*, testbed_names_only: bool = False) -> list[str]:
    """Remove every ``l7g*`` network namespace and root-namespace interface that no live testbed
    run owns, ending the processes still inside those namespaces (by PID). Returns what it removed.

    With `testbed_names_only`, touch only namespaces named like a testbed run's
    (``l7g-<4 hex>-...``) whose run is dead: what `Testbed` does at start, so that it never
    removes another tool's namespaces while that tool runs. Runs in progress are never touched.
    """
    namespaces, links = select_leftovers(list_netns(), _root_l7g_links(), _run_is_live,
                                         testbed_names_only=testbed_names_only)
    failed: list[str] = []
    removed_paths: list[str] = []
    for netns in namespaces:
        try:
            _delete_netns(netns)
        except TestbedError as exc:
            log.warning("%s", exc)
            failed.append(f"netns {netns}")
    # The testbed never creates interfaces in the root namespace; these are someone else's.
    if links:
        with _Netlink(None) as nl:
            for ifname in links:
                try:
                    nl(f"deleting {ifname}", "link", "del", index=nl.index(ifname))
                except TestbedError as exc:
                    log.warning("%s", exc)
                    failed.append(f"link {ifname}")
    for leftover in _dead_run_paths(_run_is_live):
        _remove_path(leftover)
        removed_paths.append(str(leftover))
    if LOCK_DIR.is_dir():
        for lock in LOCK_DIR.glob("*.lock"):
            if not _run_is_live(lock.stem):
                lock.unlink(missing_ok=True)
    removed = [item for item in [f"netns {n}" for n in namespaces] + [f"link {n}" for n in links]
               if item not in failed] + removed_paths
    if removed:
        log.warning("removed leftovers of crashed runs: %s", ", ".join(removed))
    return removed


def _dead_run_paths(is_live: Callable[[str], bool]) -> list[Path]:
    """A crashed run's hosts directories (/etc/netns/l7g-<run>-*) and node cgroups
    (<cgroup root>/l7g-<run>-*)."""
    out: list[Path] = []
    for parent in (NETNS_ETC, CGROUP_ROOT):
        try:
            children = sorted(parent.iterdir())
        except OSError:
            continue
        for child in children:
            match = _TESTBED_NETNS.fullmatch(child.name)
            if match is not None and child.is_dir() and not is_live(match.group(1)):
                out.append(child)
    return out


def remove_cgroup(path: Path, timeout: float = 10.0) -> None:
    """Remove a cgroup of ours (rmdir), ending by PID what still runs in it first: processes
    that were started there. Gone already is fine."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pids = [int(x) for x in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        if pids:
            _end_processes(pids)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TestbedError(f"removing cgroup {path}: {exc}") from None
            time.sleep(0.05)


def _remove_path(path: Path) -> None:
    """Remove a hosts directory or a node cgroup of a run."""
    if path.is_relative_to(CGROUP_ROOT):
        remove_cgroup(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def hosts_file(entries: Sequence[tuple[str, Sequence[str]]]) -> str:
    """The text of a pod's /etc/hosts: localhost, then `address name...` lines."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{addr}\t{' '.join(names)}" for addr, names in entries]
    return "\n".join(lines) + "\n"


# --- handles ---------------------------------------------------------------------------------


class Netns:
    """A network namespace created by a `Testbed` (a node or a pod)."""

    def __init__(self, testbed: Testbed, name: str, netns: str) -> None:
        self.testbed = testbed
        self.name = name
        self.netns = netns

    @property
    def path(self) -> str:
        """The netns file (``/run/netns/...``), for setns() or a BPF netns link."""
        return str(NETNS_DIR / self.netns)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run(argv)` inside this namespace. Defaults: capture_output, text,
        timeout=60, check=False (as subprocess.run); proxy variables are removed from env."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        kwargs["env"] = _clean_env(kwargs.get("env"))
        full = _in_cgroup(kwargs.pop("cgroup", None), ["ip", "netns", "exec", self.netns, *argv])
        return subprocess.run(full, **kwargs)

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside this namespace. The testbed ends it (by PID) at
        teardown. stdout and stderr go to `Testbed.log_path(proc)` unless given."""
        return self.testbed._spawn(self, argv, **kwargs)

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with the calling thread inside this namespace."""
        with netns_entered(self.netns):
            yield

    def tcp_connect(self, ip: str, port: int, timeout: float = 2.0) -> bool:
        """True if a TCP connection from this namespace to ip:port is accepted within timeout."""
        with self.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def ping(self, ip: str, count: int = 1, timeout: float = 2.0) -> bool:
        """True if `ip` answers ICMP echo from this namespace."""
        wait = str(max(1, round(timeout)))
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", wait, ip]
        return self.run(argv).returncode == 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} netns={self.netns}>"


@dataclass(frozen=True, slots=True)
class LinkEnd:
    """One end of a node-to-node link, in `node`, leading to `peer`."""

    node: str
    ifname: str
    ifindex: int
    peer: str


class Node(Netns):
    """A node: a netns that forwards between its pods and its links."""

    def __init__(self, testbed: Testbed, name: str, netns: str, index: int, cluster: str,
                 cidr: ipaddress.IPv4Network) -> None:
        super().__init__(testbed, name, netns)
        self.index = index
        self.cluster = cluster
        self.cidr = cidr
        self.ip = str(cidr.network_address + 1)
        self.pods: list[Pod] = []
        self.links: dict[str, LinkEnd] = {}  # peer node name -> this node's end
        self.labels: dict[str, str] = {}  # its Node's labels (`manifest`)
        # cgroup v2 directory of this node's pods (`add_node(cgroup=True)`): where the kernel
        # datapath's socket programs attach (Cilium attaches at the cgroup root; a node here
        # is not a machine of its own, so its pods get a cgroup of their own)
        self.cgroup: Path | None = None

    @property
    def link_ifnames(self) -> list[str]:
        return [end.ifname for end in self.links.values()]

    def manifest(self) -> dict[str, Any]:
        """This node as a Kubernetes Node object (its `labels`, its address as the InternalIP),
        for `l7gate endpoint apply` and `policy trace`."""
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": dict(self.labels),
                         "annotations": {CLUSTER_ANNOTATION: self.cluster}},
            "status": {"addresses": [{"type": "InternalIP", "address": self.ip},
                                     {"type": "Hostname", "address": self.name}]},
        }

    def _allocate(self, ip: str | None) -> str:
        used = {self.ip, *(p.ip for p in self.pods)}
        if ip is not None:
            addr = ipaddress.IPv4Address(ip)
            if addr not in self.cidr or addr in (self.cidr.network_address, self.cidr.broadcast_address):
                raise ValueError(f"pod IP {ip} is not a host address of node {self.name}'s {self.cidr}")
            if str(addr) in used:
                raise ValueError(f"IP {ip} is already used on node {self.name}")
            return str(addr)
        for offset in range(FIRST_POD_OFFSET, self.cidr.num_addresses - 1):
            candidate = str(self.cidr.network_address + offset)
            if candidate not in used:
                return candidate
        raise ValueError(f"node {self.name}: no free address left in {self.cidr}")


class Pod(Netns):
    """A pod: a netns with one ``eth0`` whose peer (`host_ifname`) is in its node."""

    def __init__(self, testbed: Testbed, name: str, netns: str, *, node: Node, namespace: str,
                 ip: str, labels: Mapping[str, str], ports: tuple[int, ...],
                 service_account: str, host_ifname: str) -> None:
        super().__init__(testbed, name, netns)
        self.node = node
        self.namespace = namespace
        self.ip = ip
        self.labels = dict(labels)
        self.ports = ports
        self.service_account = service_account
        self.host_ifname = host_ifname
        self.host_ifindex = 0  # set once the veth exists

    @property
    def cluster(self) -> str:
        return self.node.cluster

    @property
    def ref(self) -> str:
        """``cluster/namespace/name``, as `l7gate policy trace --from` takes it."""
        return f"{self.cluster}/{self.namespace}/{self.name}"

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """As `Netns.run`, inside the node's pod cgroup unless `cgroup` says otherwise."""
        if kwargs.get("cgroup") is None:
            kwargs["cgroup"] = self.node.cgroup
        return super().run(argv, **kwargs)

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """As `Netns.spawn`, inside the node's pod cgroup unless `cgroup` says otherwise."""
        if kwargs.get("cgroup") is None:
            kwargs["cgroup"] = self.node.cgroup
        return super().spawn(argv, **kwargs)

    def serve_http(self, port: int, timeout: float = 10.0, cgroup: str | Path | None = None) -> subprocess.Popen[Any]:
        """Start scripts/pod_server.py on ip:port in this pod and return once it listens."""
        proc = self.spawn([sys.executable, str(POD_SERVER), "--listen", f"{self.ip}:{port}",
                           "--name", f"{self.namespace}/{self.name}"], cgroup=cgroup)
        logfile = self.testbed.log_path(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "serving on" in logfile.read_text(errors="replace"):
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        raise TestbedError(f"pod {self.name}: HTTP server on {self.ip}:{port} did not start: "
                           f"{logfile.read_text(errors='replace')[-2000:]}")

    def curl(self, url: str, method: str = "GET", data: str | bytes | None = None,
             timeout: float = 5.0, headers: Mapping[str, str] | None = None) -> tuple[int, str]:
        """Run ``curl`` in this pod. Returns (HTTP status, body); status 0 when no HTTP response
        came back (refused, reset, timed out), and then the body is curl's error message."""
        argv = ["curl", "-sS", "--noproxy", "*", "--max-time", str(timeout),
                "-o", "-", "-w", "\n%{http_code}"]
        argv += ["--head"] if method == "HEAD" else ["-X", method]
        for key, value in (headers or {}).items():
            argv += ["-H", f"{key}: {value}"]
        if data is not None:
            argv += ["--data-binary", "@-"]
        payload = data.encode() if isinstance(data, str) else data
        proc = self.run([*argv, url], input=payload, text=False, timeout=timeout + 10)
        out = proc.stdout.decode(errors="replace")
        body, _, code = out.rpartition("\n")
        status = int(code) if code.isdigit() else 0
        if status == 0:
            return 0, proc.stderr.decode(errors="replace").strip()
        return status, body

    def manifest(self) -> dict[str, Any]:
        """This pod as a Kubernetes Pod object, for `l7gate endpoint apply`."""
        container: dict[str, Any] = {"name": "app", "image": "l7gate/testbed-pod"}
        if self.ports:
            container["ports"] = [{"containerPort": p, "protocol": "TCP"} for p in self.ports]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": dict(self.labels),
                         "annotations": {CLUSTER_ANNOTATION: self.cluster}},
            "spec": {"nodeName": self.node.name, "serviceAccountName": self.service_account,
                     "containers": [container]},
            "status": {"phase": "Running", "hostIP": self.node.ip, "podIP": self.ip,
                       "podIPs": [{"ip": self.ip}]},
        }


# --- the testbed -----------------------------------------------------------------------------


@dataclass
class _Spawned:
    proc: subprocess.Popen[Any]
    where: str
    log: Path | None
    files: list[IO[bytes]] = field(default_factory=list)


class Testbed:
    """A set of nodes and pods in network namespaces; a context manager that removes everything
    it created on exit, also when the body raised. Owns its namespaces and spawned processes."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, keep_logs: bool = False) -> None:
        self.run_id = ""
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Pod] = {}
        self.keep_logs = keep_logs
        self.workdir = Path()
        self._netns: list[str] = []  # creation order
        self._spawned: list[_Spawned] = []
        self._lock_fd: int | None = None
        self._pod_count = 0
        self.services: list[dict[str, Any]] = []  # Service objects (`add_service`)
        self._paths: list[Path] = []  # hosts directories and cgroups, removed at close

    # lifecycle

    def __enter__(self) -> Testbed:
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (network namespaces)")
        cleanup_all(testbed_names_only=True)
        self._claim_run_id()
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"l7g-testbed-{self.run_id}-"))
        except BaseException:
            self.close(raise_on_leftovers=False)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(raise_on_leftovers=exc is None)

    def _claim_run_id(self) -> None:
        LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        existing = list_netns()
        for _ in range(100):
            run = secrets.token_hex(2)
            if any(n.startswith(f"{PREFIX}-{run}-") for n in existing):
                continue
            try:
                fd = os.open(LOCK_DIR / f"{run}.lock", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.run_id, self._lock_fd = run, fd
            return
        raise TestbedError("no free testbed run id")

    def close(self, *, raise_on_leftovers: bool = True) -> None:
        """Tear everything down: spawned processes, leftover processes, namespaces."""
        errors: list[str] = []
        for spawned in reversed(self._spawned):
            try:
                self._stop(spawned)
            except Exception as exc:  # keep tearing down
                errors.append(f"stopping {spawned.proc.args!r}: {exc}")
        self._spawned.clear()
        for netns in reversed(self._netns):
            try:
                _delete_netns(netns)
            except Exception as exc:
                errors.append(f"deleting netns {netns}: {exc}")
        left = [n for n in list_netns() if n in self._netns]
        self._netns.clear()
        for path in reversed(self._paths):
            try:
                _remove_path(path)
            except Exception as exc:
                errors.append(str(exc))
        self._paths.clear()
        if self._lock_fd is not None:
            (LOCK_DIR / f"{self.run_id}.lock").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.workdir != Path() and not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if left:
            errors.append(f"namespaces still present: {left}")
        if errors:
            log.error("testbed %s teardown: %s", self.run_id, "; ".join(errors))
            if raise_on_leftovers:
                raise TestbedError(f"testbed {self.run_id} teardown: " + "; ".join(errors))

    def _stop(self, spawned: _Spawned) -> None:
        proc = spawned.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for f in spawned.files:
            f.close()

    # building

    def _netns_name(self, name: str) -> str:
        netns = f"{PREFIX}-{self.run_id}-{name}"
        if netns in self._netns:
            raise ValueError(f"a node or pod named {name!r} already exists in this testbed")
        return netns

    def _add_netns(self, netns: str, sysctls: Sequence[tuple[str, str]]) -> None:
        if not self.run_id:
            raise TestbedError("use the Testbed as a context manager (`with Testbed() as tb:`)")
        _create_netns(netns)
        self._netns.append(netns)
        _write_sysctls(netns, sysctls)

    def add_node(self, name: str, cluster: str = "default", node_cidr: str | None = None,
                 cgroup: bool = False, labels: Mapping[str, str] | None = None) -> Node:
        """A node namespace forwarding for pods in `node_cidr` (default: the first free
        10.N.0.0/24 with N ≥ 1). Its node IP is the CIDR's first host, on its ``lo``. With
        `cgroup`, the node's pods run in a cgroup v2 directory of its own (`Node.cgroup`,
        ``<cgroup root>/l7g-<run>-<node>``)."""
        if node_cidr is None:
            taken = [n.cidr for n in self.nodes.values()]
            free = (ipaddress.IPv4Network(f"10.{n}.0.0/24") for n in range(1, 256))
            cidr = next(c for c in free if not any(c.overlaps(t) for t in taken))
        else:
            cidr = ipaddress.IPv4Network(node_cidr)
        for other in self.nodes.values():
            if cidr.overlaps(other.cidr):
                raise ValueError(f"node {name}'s {cidr} overlaps node {other.name}'s {other.cidr}")
        if cidr.num_addresses < 16:
            raise ValueError(f"node CIDR {cidr} is too small (at least /28)")
        netns = self._netns_name(name)
        self._add_netns(netns, _NODE_SYSCTLS)
        node = Node(self, name, netns, len(self.nodes) + 1, cluster, cidr)
        node.labels = dict(labels or {})
        self.nodes[name] = node
        with _Netlink(netns) as nl:
            nl.add_address(nl.up("lo"), "lo", node.ip)
        if cgroup:
            if not (CGROUP_ROOT / "cgroup.procs").exists():
                raise TestbedError(f"no cgroup v2 at {CGROUP_ROOT}")
            path = CGROUP_ROOT / netns
            path.mkdir()
            self._paths.append(path)
            node.cgroup = path
        return node

    def add_pod(self, node: Node, namespace: str, name: str, ip: str | None = None,
                labels: Mapping[str, str] | None = None, ports: Sequence[int] = (),
                service_account: str = "default") -> Pod:
        """A pod namespace on `node` with ``eth0`` = `ip`/32 (allocated from the node's CIDR if
        None) and a default route via the node IP."""
        if node.testbed is not self:
            raise ValueError(f"node {node.name} belongs to another testbed")
        pod_ip = node._allocate(ip)
        netns = self._netns_name(name)
        self._pod_count += 1
        host_if = _ifname(self.run_id, "p", str(self._pod_count))
        self._add_netns(netns, _POD_SYSCTLS)
        pod = Pod(self, name, netns, node=node, namespace=namespace, ip=pod_ip,
                  labels=labels or {}, ports=tuple(ports), service_account=service_account,
                  host_ifname=host_if)
        with _Netlink(node.netns) as in_node, _Netlink(netns) as in_pod:
            in_node.add_veth(host_if, "eth0", netns)
            in_pod.up("lo")
            eth0 = in_pod.up("eth0")
            in_pod.add_address(eth0, "eth0", pod_ip)
            in_pod.add_route(f"{node.ip}/32", eth0, "eth0")
            in_pod.add_route("0.0.0.0/0", eth0, "eth0", via=node.ip)
            pod.host_ifindex = in_node.up(host_if)
            in_node.add_route(f"{pod_ip}/32", pod.host_ifindex, host_if)
        node.pods.append(pod)
        self.pods[name] = pod
        self._write_hosts(pod)
        return pod

    # Services and names

    def add_service(self, namespace: str, name: str, cluster_ip: str,
                    ports: Sequence[Mapping[str, Any]], selector: Mapping[str, str] | None = None,
                    cluster: str = "default", annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        """A Service object (for `to_manifests`), and its names in the hosts file of every pod of
        `cluster`: ``<name>.<namespace>.svc.cluster.local`` and ``<name>.<namespace>``, plus
        ``<name>`` for pods of the same namespace (the search path a pod's resolv.conf has).
        A hosts file per pod namespace stands in for cluster DNS. `ports`: Service ports
        (``{"name", "port", "protocol", "targetPort"}``)."""
        obj: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace,
                         "annotations": {CLUSTER_ANNOTATION: cluster, **(annotations or {})}},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "ports": [dict(p) for p in ports]},
        }
        if selector is not None:
            obj["spec"]["selector"] = dict(selector)
        self.services = [s for s in self.services if not (
            s["metadata"]["name"] == name and s["metadata"]["namespace"] == namespace
            and s["metadata"]["annotations"][CLUSTER_ANNOTATION] == cluster)]
        self.services.append(obj)
        for pod in self.pods.values():
            if pod.cluster == cluster:
                self._write_hosts(pod)
        return obj

    def _write_hosts(self, pod: Pod) -> None:
        entries: list[tuple[str, Sequence[str]]] = []
        for svc in self.services:
            meta = svc["metadata"]
            if meta["annotations"][CLUSTER_ANNOTATION] != pod.cluster:
                continue
            name, ns = meta["name"], meta["namespace"]
            names = [f"{name}.{ns}.svc.{CLUSTER_DOMAIN}", f"{name}.{ns}"]
            if ns == pod.namespace:
                names.append(name)
            entries.append((svc["spec"]["clusterIP"], names))
        directory = NETNS_ETC / pod.netns
        if directory not in self._paths:
            directory.mkdir(parents=True, exist_ok=True)
            self._paths.append(directory)
        (directory / "hosts").write_text(hosts_file(entries))

    def link(self, node_a: Node, node_b: Node) -> tuple[LinkEnd, LinkEnd]:
        """Join two nodes with a veth pair and route each one's pod CIDR to the other over it."""
        if node_a is node_b or node_b.name in node_a.links:
            raise ValueError(f"cannot link {node_a.name} and {node_b.name} (same node or already linked)")
        if_a = _ifname(self.run_id, "n", str(node_b.index))  # in A, named after B
        if_b = _ifname(self.run_id, "n", str(node_a.index))
        index: dict[str, int] = {}
        with _Netlink(node_a.netns) as in_a, _Netlink(node_b.netns) as in_b:
            in_a.add_veth(if_a, if_b, node_b.netns)
            for nl, ifname, peer in ((in_a, if_a, node_b), (in_b, if_b, node_a)):
                index[ifname] = nl.up(ifname)
                nl.add_route(f"{peer.ip}/32", index[ifname], ifname)
                nl.add_route(str(peer.cidr), index[ifname], ifname, via=peer.ip)
        end_a = LinkEnd(node_a.name, if_a, index[if_a], node_b.name)
        end_b = LinkEnd(node_b.name, if_b, index[if_b], node_a.name)
        node_a.links[node_b.name] = end_a
        node_b.links[node_a.name] = end_b
        return end_a, end_b

    # processes

    def _spawn(self, where: Netns, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        files: list[IO[bytes]] = []
        logfile: Path | None = None
        if "stdout" not in kwargs or "stderr" not in kwargs:
            logfile = self.workdir / f"{where.name}-{len(self._spawned) + 1}.log"
            out = open(logfile, "wb")
            files.append(out)
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs["env"] = _clean_env(kwargs.get("env"))
        # `ip netns exec` also gives the process a private /sys, which hides the host's bpffs
        # (/sys/fs/bpf): an agent that pins BPF maps must enter the network namespace only.
        if kwargs.pop("net_only", False):
            prefix = ["nsenter", f"--net={where.path}"]
        else:
            prefix = ["ip", "netns", "exec", where.netns]
        proc = subprocess.Popen(_in_cgroup(kwargs.pop("cgroup", None), [*prefix, *argv]), **kwargs)
        self._spawned.append(_Spawned(proc, where.netns, logfile, files))
        return proc

    def log_path(self, proc: subprocess.Popen[Any]) -> Path:
        """The file a spawned process's output goes to."""
        for spawned in self._spawned:
            if spawned.proc is proc and spawned.log is not None:
                return spawned.log
        raise KeyError(f"no log file for {proc.args!r}")

    # Kubernetes objects

    def to_manifests(self, cluster: str | None = None, *, nodes: bool = False) -> list[dict[str, Any]]:
        """Namespace and Pod objects for every pod (of `cluster`, if given), namespaces first,
        for ``l7gate endpoint apply``; with `nodes`, Node objects for the nodes too."""
        pods = [p for p in self.pods.values() if cluster is None or p.cluster == cluster]
        namespaces = sorted({(p.cluster, p.namespace) for p in pods})
        out: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns},
                          "annotations": {CLUSTER_ANNOTATION: cl}}}
            for cl, ns in namespaces
        ]
        if nodes:
            out.extend(n.manifest() for n in self.nodes.values() if cluster is None or n.cluster == cluster)
        out.extend(p.manifest() for p in pods)
        out.extend(s for s in self.services
                   if cluster is None or s["metadata"]["annotations"][CLUSTER_ANNOTATION] == cluster)
        return out
