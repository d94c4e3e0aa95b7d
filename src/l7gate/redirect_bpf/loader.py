"""Loading, pinning, attaching and writing the kernel datapath (bcc).

Theory of operation. All maps live pinned under one directory (`/sys/fs/bpf/l7g/<node>/`),
so they outlive the agent: programs stay attached (tc holds them) and keep enforcing while the
agent is away. Opening the datapath:

1. checks the pinned maps already there: the `meta` map must hold our magic and layout
   version, and every map must have the expected type, key size and value size. Anything else
   is foreign or corrupt: it is logged, unpinned and created afresh — never trusted;
2. compiles `datapath.c` with bcc, which reuses the pinned maps (or creates and pins them);
3. pins the programs next to the maps. `attach` opens a pinned program by its path and hands
   its fd to tc over netlink (pyroute2), as one filter per hook at a fixed pref and handle, so
   the next agent replaces an attachment atomically in place and never adds a second one.

Writers reconcile: they read what the kernel has, and write only the difference (no flush, so
a restarting agent never opens a window where traffic is wrongly allowed or dropped).

Netlink (tc, routes, links) goes through `Rtnl`, a short-lived pyroute2 socket in the calling
thread's network namespace whose errors are `DatapathError`s naming the interface or address.

Not thread-safe except `poll_events`, which runs on its own thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import importlib.util
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any

from ..records import KernelDrop
from .compile import PolicyKey, PolicyValue

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
SOURCE = Path(__file__).with_name("datapath.c")
SOCKOPS_SOURCE = Path(__file__).with_name("sockops.c")
# bcc compiles a source as /virtual/main.c: "shared.h" (what datapath.c and sockops.c share)
# is found through this include path.
INCLUDE = f"-I{Path(__file__).parent}"
MAGIC = 0x6C376761746531  # "l7gate1"
LAYOUT = 2  # 2: auth entries per remote node, nodes map
BCC_PATH = "/usr/lib/python3/dist-packages"

# name -> (BPF map type, key size, value size); mirrors datapath.c
MAPS: dict[str, tuple[str, int, int]] = {
    "meta": ("array", 4, 16),
    "ipcache": ("lpm_trie", 8, 4),
    "endpoints": ("hash", 4, 8),
    "policy": ("lpm_trie", 16, 4),
    "auth": ("hash", 16, 8),
    "ct": ("lru_hash", 16, 8),
    "tunnel": ("hash", 12, 4),
    "nodes": ("hash", 4, 4),
    # the socket load balancer (lb.c, lb.py)
    "lb_services": ("hash", 8, 8),
    "lb_backends": ("hash", 8, 8),
    "lb_reverse": ("lru_hash", 16, 8),
}
PROGRAMS = ("l7g_from_pod", "l7g_from_link", "l7g_to_pod", "l7g_to_link")
DROP_REASONS = {
    1: "Policy denied",
    2: "No policy",
    3: "Authentication required",
    4: "Unknown endpoint",
    5: "Unsupported packet (IPv6 or IP fragment)",
    6: "Plaintext refused",
    7: "Egress proxy not listening",
    8: "Connection 4-tuple in use by the egress proxy",
}


# The clsact qdisc's hooks, as tc parents: TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / _EGRESS).
TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
FILTER_PREF = 1  # our one filter per hook, at this pref and handle: replaced in place, never added twice
FILTER_HANDLE = 1
# kind of interface -> (hook, tc parent, program) for each filter it gets
HOOKS: dict[str, tuple[tuple[str, int, str], ...]] = {
    "pod": (("ingress", TC_INGRESS, "l7g_from_pod"), ("egress", TC_EGRESS, "l7g_to_pod")),
    "link": (("ingress", TC_INGRESS, "l7g_from_link"), ("egress", TC_EGRESS, "l7g_to_link")),
}


class DatapathError(Exception):
    pass


class NoSuchInterface(DatapathError):
    """The interface does not exist (any more) in this network namespace."""


def import_bcc() -> Any:
    """bcc's Python package comes from Debian (python3-bpfcc). Load that one package from
    Debian's directory without putting the directory on sys.path: it also holds Debian's own
    (older) pyOpenSSL, cryptography and the like, which must not shadow the venv's."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    pkg = Path(BCC_PATH) / "bcc"
    spec = importlib.util.spec_from_file_location(
        "bcc", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    if spec is None or spec.loader is None or not (pkg / "__init__.py").exists():
        raise DatapathError("bcc is not installed (apt install python3-bpfcc)")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules["bcc"]
        raise DatapathError(f"bcc cannot be loaded: {exc}") from None
    return module


def _addr_u32(ip: str | ipaddress.IPv4Address) -> int:
    """An IPv4 address as the u32 the program reads from the packet (network byte order)."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def _u32_addr(v: int) -> str:
    return str(ipaddress.IPv4Address(v.to_bytes(4, "little")))


def _bpftool_map(path: Path) -> dict[str, Any] | None:
    try:
        out = subprocess.run(
            ["bpftool", "-j", "map", "show", "pinned", str(path)],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except FileNotFoundError:
        raise DatapathError("bpftool is not installed (apt install bpftool)") from None
    if out.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def check_pins(pin_dir: Path, names: Iterable[str] | None = None) -> list[str]:
    """Problems with the maps already pinned in `pin_dir` (empty: fine, or nothing there).
    `names`: check only these maps of `MAPS` (and `meta`); None: all of them."""
    problems: list[str] = []
    if not pin_dir.exists():
        return problems
    wanted = None if names is None else {*names, "meta"}
    for name, (mtype, ksize, vsize) in MAPS.items():
        if wanted is not None and name not in wanted:
            continue
        path = pin_dir / name
        if not path.exists():
            continue
        info = _bpftool_map(path)
        if info is None:
            problems.append(f"{path}: not a BPF map")
            continue
        if info.get("type") != mtype or info.get("bytes_key") != ksize or info.get("bytes_value") != vsize:
            problems.append(
                f"{path}: is a {info.get('type')} map with {info.get('bytes_key')}-byte keys and "
                f"{info.get('bytes_value')}-byte values, expected {mtype} {ksize}/{vsize}"
            )
    meta = pin_dir / "meta"
    if meta.exists() and not problems:
        raw = subprocess.run(
            ["bpftool", "-j", "map", "lookup", "pinned", str(meta), "key", "0", "0", "0", "0"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        ok = False
        if raw.returncode == 0:
            value = json.loads(raw.stdout).get("value")
            if isinstance(value, list):
                b = bytes(int(x, 16) for x in value)
                magic, layout = struct.unpack("<QI", b[:12])
                ok = magic == MAGIC and layout == LAYOUT
                if not ok and magic != 0:
                    problems.append(f"{meta}: magic/layout {magic:#x}/{layout}, expected {MAGIC:#x}/{LAYOUT}")
                elif not ok:
                    problems.append(f"{meta}: no l7gate magic: not ours")
        else:
            problems.append(f"{meta}: unreadable")
    elif not meta.exists() and any((pin_dir / n).exists() for n in MAPS if wanted is None or n in wanted):
        problems.append(f"{pin_dir}: maps pinned without l7gate's meta map: not ours")
    return problems


class KernelDatapath:
    def __init__(self, pin_dir: Path, egress_proxy_port: int = 0) -> None:
        self.pin_dir = pin_dir
        # Egress HTTP rules: the port of the node's egress proxy on 127.0.0.1 (0: none, such
        # connections are dropped as "Egress proxy not listening"). Compiled into the program.
        self.egress_proxy_port = egress_proxy_port
        self.bpf: Any = None
        self._fns: dict[str, Any] = {}
        self._policy_written: dict[PolicyKey, PolicyValue] = {}
        self._attached: dict[str, str] = {}
        self._stop = threading.Event()
        self.replaced: list[str] = []
        self.sockops_bpf: Any = None
        self.cgroup: Path | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        if not os.path.ismount(BPFFS):
            raise DatapathError(f"bpffs is not mounted at {BPFFS} (mount -t bpf bpf {BPFFS})")
        bcc = import_bcc()
        problems = check_pins(self.pin_dir)
        if problems:
            for p in problems:
                log.warning("pinned map refused: %s; replacing it with a fresh one", p)
            self.replaced = problems
            self._unpin_maps()
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.bpf = bcc.BPF(
                src_file=str(SOURCE).encode(),
                cflags=[f'-DL7G_PIN_DIR="{self.pin_dir}"', f"-DL7G_EGRESS_PROXY_PORT={int(self.egress_proxy_port)}",
                        INCLUDE, "-w"],
            )
            for name in PROGRAMS:
                self._fns[name] = self.bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS)
        except Exception as exc:
            raise DatapathError(f"cannot compile or load the BPF programs: {exc}") from None
        meta = self.bpf[b"l7g_meta"]
        v = meta.Leaf()
        v.magic = MAGIC
        v.layout = LAYOUT
        meta[meta.Key(0)] = v
        for name, fn in self._fns.items():
            path = self.pin_dir / f"prog_{name}"
            if path.exists():
                path.unlink()
            rc = self.bpf_obj_pin(fn.fd, str(path))
            if rc != 0:
                raise DatapathError(f"cannot pin {name} at {path}")
        self._policy_written = self._read_policy()

    def accelerate(self, cgroup: Path) -> None:
        """Socket acceleration (sockops + sk_msg) for the sockets of processes in `cgroup`
        (cgroup v2): pod↔proxy and pod↔pod connections on this node skip the veth once
        established. Replaces an l7gate sockops program already attached there."""
        bcc = import_bcc()
        if not (cgroup / "cgroup.procs").exists():
            raise DatapathError(f"{cgroup} is not a cgroup v2 directory")
        try:
            self.sockops_bpf = bcc.BPF(
                src_file=str(SOCKOPS_SOURCE).encode(), cflags=[f'-DL7G_PIN_DIR="{self.pin_dir}"', INCLUDE, "-w"]
            )
            sockops = self.sockops_bpf.load_func(b"l7g_sockops", bcc.BPF.SOCK_OPS)
            skmsg = self.sockops_bpf.load_func(b"l7g_skmsg", bcc.BPF.SK_MSG)
        except Exception as exc:
            raise DatapathError(f"cannot compile or load the socket acceleration: {exc}") from None
        _detach_cgroup_sockops(cgroup)
        fd = os.open(cgroup, os.O_RDONLY)
        try:
            from bcc.libbcc import lib  # type: ignore[import-not-found]

            map_fd = lib.bpf_table_fd(self.sockops_bpf.module, b"l7g_socks")
            self.sockops_bpf.attach_func(skmsg, map_fd, bcc.BPFAttachType.SK_MSG_VERDICT)
            self.sockops_bpf.attach_func(sockops, fd, bcc.BPFAttachType.CGROUP_SOCK_OPS)
        finally:
            os.close(fd)
        self.cgroup = cgroup

    def bpf_obj_pin(self, fd: int, path: str) -> int:
        lib = import_bcc().libbcc.lib
        lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        return int(lib.bpf_obj_pin(fd, path.encode()))

    def _unpin_maps(self) -> None:
        for name in MAPS:
            p = self.pin_dir / name
            if p.exists() or p.is_symlink():
                p.unlink()

    def uninstall(self) -> None:
        """Detach everything this datapath attached and remove every pin (tests, teardown)."""
        for ifname in list(self._attached):
            self.detach(ifname)
        if self.cgroup is not None:
            _detach_cgroup_sockops(self.cgroup)
        if self.pin_dir.exists():
            shutil.rmtree(self.pin_dir, ignore_errors=True)

    # -- attachment -----------------------------------------------------------------------------

    def attach(self, ifname: str, kind: str, nl: Rtnl | None = None) -> None:
        """`kind` "pod": a pod's host-side veth; "link": an inter-node interface. Idempotent, for
        the reconcile after a restart (decision 7): an existing clsact qdisc is kept, and our
        filter on each hook is replaced in place by the pinned program, so traffic goes from
        the old program to the new one with no gap and the hook never holds two of ours.
        `nl`: a socket to reuse (one is opened otherwise)."""
        hooks = HOOKS.get(kind)
        if hooks is None:
            raise ValueError(kind)
        with rtnl(nl) as rt:
            index = rt.link_index(ifname)
            rt.ensure_clsact(index, ifname)
            for hook, parent, prog in hooks:
                fd = self._pinned_program(prog)
                try:
                    rt.replace_bpf_filter(index, ifname, hook, parent, fd, f"prog_{prog}")
                finally:
                    os.close(fd)
        self._attached[ifname] = kind

    def detach(self, ifname: str, nl: Rtnl | None = None) -> None:
        """Remove our filters only; other tc programs on the device, and its clsact qdisc, stay.
        An interface that is gone (a deleted pod's veth) or holds no filter of ours is fine."""
        with rtnl(nl) as rt:
            try:
                index = rt.link_index(ifname)
                for hook, parent in (("ingress", TC_INGRESS), ("egress", TC_EGRESS)):
                    rt.delete_bpf_filter(index, ifname, hook, parent)
            except NoSuchInterface:
                pass
        self._attached.pop(ifname, None)

    def _pinned_program(self, name: str) -> int:
        """A new fd for the program pinned as prog_<name> (the caller closes it)."""
        path = self.pin_dir / f"prog_{name}"
        lib = import_bcc().libbcc.lib
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        fd = int(lib.bpf_obj_get(str(path).encode()))
        if fd < 0:
            # libbpf returns -errno (1.0 mode) or -1 and sets errno
            code = -fd if fd != -1 else (ctypes.get_errno() or errno.EPERM)
            raise DatapathError(f"cannot open the pinned program {path}: {os.strerror(code)}")
        return fd

    # -- maps -----------------------------------------------------------------------------------

    def set_ipcache(self, desired: Mapping[ipaddress.IPv4Network, int]) -> int:
        """Make the ipcache map equal `desired` (IPv4 only). Returns entries written/removed."""
        t = self.bpf[b"l7g_ipcache"]
        have: dict[tuple[int, int], int] = {(k.prefixlen, k.addr): v.identity for k, v in t.items()}
        want = {(n.prefixlen, _addr_u32(n.network_address)): ident for n, ident in desired.items() if n.version == 4}
        changes = 0
        for key, ident in want.items():
            if have.get(key) != ident:
                k = t.Key(key[0], key[1])
                v = t.Leaf(ident)
                t[k] = v
                changes += 1
        for key in have.keys() - want.keys():
            del t[t.Key(key[0], key[1])]
            changes += 1
        return changes

    def upsert_ipcache(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, identity: int) -> None:
        if net.version != 4:
            return
        t = self.bpf[b"l7g_ipcache"]
        t[t.Key(net.prefixlen, _addr_u32(net.network_address))] = t.Leaf(identity)

    def delete_ipcache(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        if net.version != 4:
            return
        t = self.bpf[b"l7g_ipcache"]
        try:
            del t[t.Key(net.prefixlen, _addr_u32(net.network_address))]
        except KeyError:
            pass

    def set_endpoints(self, desired: Mapping[str, int]) -> int:
        """Local endpoints: pod IPv4 address → identity."""
        t = self.bpf[b"l7g_endpoints"]
        have = {k.value: v.identity for k, v in t.items()}
        want = {_addr_u32(ip): ident for ip, ident in desired.items()}
        changes = 0
        for addr, ident in want.items():
            if have.get(addr) != ident:
                t[t.Key(addr)] = t.Leaf(ident, 0)
                changes += 1
        for addr in have.keys() - want.keys():
            del t[t.Key(addr)]
            changes += 1
        return changes

    def _policy_key(self, t: Any, k: PolicyKey) -> Any:
        key = t.Key()
        key.prefixlen = 80 + k.port_prefix
        key.endpoint = k.endpoint
        key.direction = k.direction
        key.proto = k.proto
        key.peer = k.peer
        key.port = socket.htons(k.port)
        return key

    def _read_policy(self) -> dict[PolicyKey, PolicyValue]:
        from .compile import KAction

        t = self.bpf[b"l7g_policy"]
        out: dict[PolicyKey, PolicyValue] = {}
        for k, v in t.items():
            pk = PolicyKey(k.endpoint, k.direction, k.proto, k.peer, socket.ntohs(k.port), k.prefixlen - 80)
            try:
                out[pk] = PolicyValue(KAction(v.action), v.flags)
            except ValueError:
                out[pk] = PolicyValue(KAction.DENY, 0xFF)  # unknown value: rewrite it
        return out

    def set_policy(self, desired: Mapping[PolicyKey, PolicyValue], endpoints: Iterable[int] | None = None) -> int:
        """Make the policy map equal `desired`, for `endpoints` only (None: every endpoint).
        Writes the new entries before deleting stale ones, so no lookup falls through."""
        t = self.bpf[b"l7g_policy"]
        scope = None if endpoints is None else set(endpoints)
        have = {k: v for k, v in self._policy_written.items() if scope is None or k.endpoint in scope}
        changes = 0
        for k, v in desired.items():
            if have.get(k) != v:
                leaf = t.Leaf()
                leaf.action = int(v.action)
                leaf.flags = int(v.flags)
                t[self._policy_key(t, k)] = leaf
                self._policy_written[k] = v
                changes += 1
        for k in have.keys() - desired.keys():
            try:
                del t[self._policy_key(t, k)]
            except KeyError:
                pass
            self._policy_written.pop(k, None)
            changes += 1
        return changes

    def set_nodes(self, desired: Mapping[str, str]) -> int:
        """Pod IPv4 address → the IPv4 address of the node it runs on (for per-node auth)."""
        t = self.bpf[b"l7g_nodes"]
        have = {k.value: v.value for k, v in t.items()}
        want = {
            _addr_u32(pod): _addr_u32(node) for pod, node in desired.items()
            if ipaddress.ip_address(pod).version == 4 and ipaddress.ip_address(node).version == 4
        }
        changes = 0
        for pod, node in want.items():
            if have.get(pod) != node:
                t[t.Key(pod)] = t.Leaf(node)
                changes += 1
        for pod in have.keys() - want.keys():
            del t[t.Key(pod)]
            changes += 1
        return changes

    def set_tunnels(self, desired: Iterable[tuple[int, int, int, int]]) -> int:
        """Make the tunnel map hold exactly `desired`: (source identity, destination identity,
        IP protocol, port) whose connections from local pods go to this node's Envoy, to be
        carried over mTLS to the destination node. New entries are written first."""
        t = self.bpf[b"l7g_tunnel"]

        def key(src: int, dst: int, proto: int, port: int) -> Any:
            k = t.Key()
            k.src_id, k.dst_id, k.proto, k.port = src, dst, proto, socket.htons(port)
            return k

        have = {(k.src_id, k.dst_id, k.proto, socket.ntohs(k.port)) for k in t.keys()}
        want = set(desired)
        for item in sorted(want - have):
            t[key(*item)] = t.Leaf(1)
        for item in sorted(have - want):
            try:
                del t[key(*item)]
            except KeyError:
                pass
        return len(want ^ have)

    def tunnels(self) -> set[tuple[int, int, int, int]]:
        t = self.bpf[b"l7g_tunnel"]
        return {(k.src_id, k.dst_id, k.proto, socket.ntohs(k.port)) for k in t.keys()}

    def set_auth(self, local_id: int, remote_id: int, expires_ns: int, remote_node: str) -> None:
        t = self.bpf[b"l7g_auth"]
        k = t.Key()
        k.local_id, k.remote_id, k.remote_node, k.auth_type = local_id, remote_id, _addr_u32(remote_node), 1
        t[k] = t.Leaf(expires_ns)

    def delete_auth(self, local_id: int, remote_id: int, remote_node: str) -> None:
        t = self.bpf[b"l7g_auth"]
        k = t.Key()
        k.local_id, k.remote_id, k.remote_node, k.auth_type = local_id, remote_id, _addr_u32(remote_node), 1
        try:
            del t[k]
        except KeyError:
            pass

    def policy_entries(self) -> int:
        return len(self._policy_written)

    # -- events ---------------------------------------------------------------------------------

    def poll_events(self, callback: Callable[[KernelDrop], None]) -> threading.Thread:
        """Read drop events on a background thread until `close()`."""

        def on_event(cpu: int, data: Any, size: int) -> None:
            e = self.bpf[b"l7g_events"].event(data)
            icmp = e.proto == socket.IPPROTO_ICMP  # its "dport" is the type, kept apart
            try:
                callback(
                    KernelDrop(
                        _u32_addr(e.saddr), _u32_addr(e.daddr), 0 if icmp else socket.ntohs(e.sport),
                        0 if icmp else socket.ntohs(e.dport),
                        e.proto, DROP_REASONS.get(e.reason, f"reason {e.reason}"),
                        "ingress" if e.direction == 0 else "egress", e.src_id, e.dst_id, time.time_ns(),
                        e.endpoint, e.ifindex, e.icmp_type if icmp else 0, e.icmp_code if icmp else 0,
                    )
                )
            except Exception:  # noqa: BLE001 - a bad consumer must not stop the reader
                log.exception("drop event handler failed")

        self.bpf[b"l7g_events"].open_perf_buffer(on_event, page_cnt=64)

        def run() -> None:
            while not self._stop.is_set():
                self.bpf.perf_buffer_poll(timeout=200)

        th = threading.Thread(target=run, name="l7gate-bpf-events", daemon=True)
        th.start()
        return th

    def close(self) -> None:
        """Stop reading events. Programs stay attached and maps stay pinned (on purpose)."""
        self._stop.set()


def _detach_cgroup_sockops(cgroup: Path) -> None:
    """Detach the l7gate sockops program(s) attached to `cgroup` (a previous agent's)."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return
    for prog in json.loads(out.stdout):
        # bpftool 7.1 says "cgroup_sock_ops", older ones "sock_ops"
        if prog.get("attach_type") in ("sock_ops", "cgroup_sock_ops") and prog.get("name", "").startswith("l7g_"):
            subprocess.run(["bpftool", "cgroup", "detach", str(cgroup), "sock_ops", "id", str(prog["id"])],
                           capture_output=True, check=False)


class Rtnl:
    """Route netlink requests (links, routes, rules, tc) through one pyroute2 socket opened in
    the calling thread's network namespace; a `NetlinkError` becomes a `DatapathError` that
    says what was asked and of which interface or address (`NoSuchInterface` for ENODEV).

    Short-lived on purpose: `with Rtnl() as nl:` around one batch of requests. pyroute2 keeps
    a socket and an event loop per thread, and the agent calls in from several threads (admin
    workers, the reconcile loop), so each batch opens its own socket (~0.2 ms) in the thread
    that uses it and closes it. pyroute2's synchronous API runs its own event loop, so a thread
    that runs an asyncio loop cannot use it (refused here with a clear error). Not thread-safe;
    owned by the caller.
    """

    def __init__(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # the normal case: a plain thread
        else:
            raise DatapathError("netlink requests cannot be made on a thread running an asyncio event "
                                "loop (pyroute2 runs its own): call from a worker thread")
        pyroute2 = _pyroute2()
        self._netlink_error: type[Exception] = pyroute2.NetlinkError
        try:
            # groups=0: requests only, no multicast subscription whose events would queue up
            self.ipr: Any = pyroute2.IPRoute(groups=0)
        except OSError as exc:
            raise DatapathError(f"cannot open a netlink socket: {exc}") from None
        # name -> index learnt from a route lookup in this batch, so that attaching to the
        # interface just looked up costs no second request
        self._index: dict[str, int] = {}

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.ipr.close()

    def call(self, what: str, method: str, *args: Any, ok: Collection[int] = (), **kwargs: Any) -> Any:
        """`IPRoute.<method>(*args, **kwargs)`; a netlink error whose errno is in `ok` gives
        None, any other raises a DatapathError starting with `what`."""
        try:
            return getattr(self.ipr, method)(*args, **kwargs)
        except self._netlink_error as exc:
            code = int(getattr(exc, "code", 0))
            if code in ok:
                return None
            cls = NoSuchInterface if code == errno.ENODEV else DatapathError
            raise cls(f"{what}: {os.strerror(code) if code > 0 else exc}") from None

    # links and routes

    def link_index(self, ifname: str) -> int:
        if ifname in self._index:
            return self._index[ifname]
        links = self.call(f"interface {ifname}", "link", "get", ifname=ifname)
        return int(links[0]["index"])

    def link_name(self, index: int) -> str:
        links = self.call(f"interface #{index}", "link", "get", index=index)
        name = str(links[0].get("IFLA_IFNAME"))
        self._index[name] = index
        return name

    def route_interface(self, dst: str, what: str = "") -> str:
        """The interface the kernel routes `dst` through (`ip route get`); `what` names `dst`
        in errors."""
        what = what or dst
        routes = self.call(f"no route to {what}", "route", "get", dst=dst)
        oif = routes[0].get("RTA_OIF") if routes else None
        if oif is None:
            raise DatapathError(f"no interface for {what}: its route has no output device")
        return self.link_name(int(oif))

    # tc

    def ensure_clsact(self, index: int, ifname: str) -> None:
        # NLM_F_REPLACE of an existing clsact changes nothing: its filters stay.
        self.call(f"clsact qdisc on {ifname}", "tc", "replace", "clsact", index)

    def replace_bpf_filter(self, index: int, ifname: str, hook: str, parent: int, fd: int, name: str) -> None:
        """Our direct-action bpf filter on `hook`, created or replaced in place."""
        self.call(f"bpf filter {name} on {ifname} {hook}", "tc", "replace-filter", "bpf", index,
                  handle=FILTER_HANDLE, prio=FILTER_PREF, parent=parent, fd=fd, name=name,
                  direct_action=True)

    def delete_bpf_filter(self, index: int, ifname: str, hook: str, parent: int) -> None:
        """Our filter on `hook`, if there: ENOENT is no such filter, EINVAL no clsact qdisc."""
        self.call(f"deleting the bpf filter on {ifname} {hook}", "tc", "del-filter", "bpf", index,
                  handle=FILTER_HANDLE, prio=FILTER_PREF, parent=parent,
                  ok=(errno.ENOENT, errno.EINVAL))


def rtnl(nl: Rtnl | None = None) -> AbstractContextManager[Rtnl]:
    """`with rtnl(nl) as rt:` — `nl` itself (left open), or a new socket closed at the end."""
    return nullcontext(nl) if nl is not None else Rtnl()


def _pyroute2() -> Any:
    """pyroute2, imported on first use: it takes 0.1-0.3 s, which only kernel mode pays."""
    import pyroute2  # type: ignore[import-untyped]

    return pyroute2
