"""The socket load balancer: Kubernetes Services translated in the kernel at connect() time
(`lb.c`), loaded with bcc, attached to the pods' cgroup v2, its maps pinned beside the
datapath's (`/sys/fs/bpf/l7g/<node>/lb_*`). IPv4 only.

Theory of operation. A frontend (ClusterIP, port, protocol) maps to a list of backends
(pod address, port). In the kernel:

- `lb_services`: (vip, port, proto) -> (backend count, service id);
- `lb_backends`: (service id, slot) -> (backend address, port), slots 0..count-1;
- `lb_reverse` (LRU, written by the programs): (socket cookie, backend) -> frontend.

A service id names one revision of one frontend's backend set; it is never reused while an
entry or a slot refers to it. `set_services` changes a frontend by writing the new set's
slots under a fresh id, then switching the service entry to (count, new id) — one map update,
atomic for a reader — then deleting the old id's slots. Hence:

- no program ever reads a count larger than the slots written under the id it reads with
  (the slots exist before the entry names them);
- a backend removed by a call is chosen by no connect that starts after the call returns: the
  switch is done by then and the old slots are gone. A connect that read the old entry just
  before the switch and finds its slot deleted looks the entry up again (lb.c).

Writers reconcile: `open()` reads the pinned maps back (a restarted agent continues from what
the kernel holds: ids after the highest live one, nothing rewritten that is already right),
deletes slots that no entry refers to (a writer that died between two steps above), and
`set_services` then writes only the frontends whose backend set differs. The agent must be
the only writer of these maps while it runs; `open()` re-reads them.

Attachment is idempotent and gap-free: `attach` adds this loader's programs to the cgroup
(BPF_F_ALLOW_MULTI), then detaches any other l7gate LB program there (a previous agent's).
For a moment both run; the second finds an address already translated (a backend, not a
frontend) and leaves it alone. Attachments outlive the loader, as the maps do.

Not thread-safe: one owner (the agent's reconcile loop) calls it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import subprocess
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .loader import BPFFS, LAYOUT, MAGIC, DatapathError, _addr_u32, _u32_addr, check_pins, import_bcc

log = logging.getLogger(__name__)

LB_SOURCE = Path(__file__).with_name("lb.c")
LB_MAPS = ("lb_services", "lb_backends", "lb_reverse")  # pin names; their layouts are in loader.MAPS
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
_PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
BPF_F_ALLOW_MULTI = 1 << 1
PROGRAM_PREFIX = "l7g_lb_"
# program -> (attach type, from uapi/linux/bpf.h enum bpf_attach_type; bpftool's names for it)
HOOKS: dict[str, tuple[int, tuple[str, ...]]] = {
    "l7g_lb_connect4": (10, ("cgroup_inet4_connect", "connect4")),  # BPF_CGROUP_INET4_CONNECT
    "l7g_lb_sendmsg4": (14, ("cgroup_udp4_sendmsg", "sendmsg4")),  # BPF_CGROUP_UDP4_SENDMSG
    "l7g_lb_recvmsg4": (19, ("cgroup_udp4_recvmsg", "recvmsg4")),  # BPF_CGROUP_UDP4_RECVMSG
    "l7g_lb_getpeer4": (29, ("cgroup_inet4_getpeername", "getpeername4")),  # BPF_CGROUP_INET4_GETPEERNAME
}
_ID_MAX = 0xFFFFFFFF

Frontend = tuple[str, int, str]  # (ClusterIP, port, "TCP" | "UDP" | "SCTP")
Backend = tuple[str, int]  # (pod address, port)


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the kernel holds for one frontend: its service id and backends in slot order
    (None: the entry names more slots than exist — not written by us; rewritten next time)."""

    id: int
    count: int
    backends: tuple[Backend, ...] | None


@dataclass(frozen=True, slots=True)
class Attachment:
    """An l7gate LB program attached to a cgroup, as the kernel lists it."""

    hook: str  # bpftool's attach type name
    prog_id: int
    name: str


def _proto_number(proto: str) -> int:
    name = proto.upper()
    if name in PROTOCOLS:
        return PROTOCOLS[name]
    if name.isdigit() and 0 < int(name) < 256:
        return int(name)  # a protocol read back from the kernel that has no name here
    raise ValueError(f"unknown protocol {proto!r} (TCP, UDP or SCTP)")


def _port(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{what}: port {value!r} is not 1-65535")
    return value


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address | None:
    """The address, or None for an IPv6 one (left out: IPv4 only)."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IP address") from None
    return addr if isinstance(addr, ipaddress.IPv4Address) else None


def _fe_str(fe: Frontend) -> str:
    return f"{fe[0]}:{fe[1]}/{fe[2]}"


def _normalise(desired: Mapping[Frontend, Sequence[Backend]]) -> dict[Frontend, tuple[Backend, ...]]:
    """Validated, canonical frontends -> backends sorted by (address, port). IPv6 frontends and
    backends are left out (IPv4 only); anything malformed raises DatapathError naming it."""
    out: dict[Frontend, tuple[Backend, ...]] = {}
    for (vip, port, proto), backends in desired.items():
        what = f"lb_services: frontend {vip}:{port}/{proto}"
        try:
            addr = _ipv4(vip, what)
            _port(port, what)
            number = _proto_number(proto)
            clean: list[tuple[int, int]] = []
            for ip, bport in backends:
                baddr = _ipv4(ip, f"{what}: backend {ip}:{bport}")
                _port(bport, f"{what}: backend {ip}:{bport}")
                if baddr is not None:
                    clean.append((int(baddr), bport))
        except ValueError as exc:
            raise DatapathError(str(exc)) from None
        if addr is None:
            continue
        fe = (str(addr), port, _PROTOCOL_NAMES.get(number, str(number)))
        out[fe] = tuple((str(ipaddress.IPv4Address(ip)), p) for ip, p in sorted(clean))
    return out


def _bpftool(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["bpftool", *argv], capture_output=True, text=True, timeout=10, check=False)
    except FileNotFoundError:
        raise DatapathError(f"{what}: bpftool is not installed (apt install bpftool)") from None


def attachments(cgroup: Path) -> list[Attachment]:
    """The l7gate LB programs attached directly to `cgroup` (empty if it does not exist)."""
    out = _bpftool(["-j", "cgroup", "show", str(cgroup)], f"cgroup {cgroup}")
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return sorted(
        (Attachment(str(p.get("attach_type")), int(p["id"]), str(p.get("name", "")))
         for p in json.loads(out.stdout) if str(p.get("name", "")).startswith(PROGRAM_PREFIX)),
        key=lambda a: (a.hook, a.prog_id),
    )


def detach_all(cgroup: Path, keep: Collection[int] = ()) -> list[Attachment]:
    """Detach every l7gate LB program from `cgroup` except the program ids in `keep` (a
    previous agent's, or everything at uninstall). Returns what it detached."""
    gone = []
    for a in attachments(cgroup):
        if a.prog_id in keep:
            continue
        out = _bpftool(["cgroup", "detach", str(cgroup), a.hook, "id", str(a.prog_id)], f"cgroup {cgroup}")
        if out.returncode != 0 and any(x.prog_id == a.prog_id for x in attachments(cgroup)):
            raise DatapathError(f"cannot detach {a.name} (id {a.prog_id}) from {cgroup}: {out.stderr.strip()}")
        gone.append(a)
    return gone


def _prog_id(fd: int) -> int:
    """The kernel's id of the program behind `fd` (from /proc/self/fdinfo)."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("prog_id:"):
            return int(line.split()[1])
    raise DatapathError(f"fd {fd} is not a BPF program")


class SocketLB:
    """Loads `lb.c`, attaches it to one cgroup, and keeps its service maps equal to what the
    agent wants. Owns the bcc module it compiled (`close()` releases it; attachments and pins
    stay). Not thread-safe."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self.bpf: Any = None
        self.cgroup: Path | None = None
        self.replaced: list[str] = []  # pinned maps refused at open (foreign or corrupt)
        self.repaired = 0  # orphaned slots deleted at open
        self._fns: dict[str, Any] = {}
        self._written: dict[Frontend, _Entry] = {}
        self._ids: set[int] = set()  # service ids in use (entries and their slots)
        self._next_id = 1

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        """Compile and load the programs (bcc), reusing the pinned maps — or refusing and
        replacing them when foreign or corrupt — and read back what they hold."""
        if not os.path.ismount(BPFFS):
            raise DatapathError(f"bpffs is not mounted at {BPFFS} (mount -t bpf bpf {BPFFS})")
        bcc = import_bcc()
        problems = check_pins(self.pin_dir, LB_MAPS)
        if problems:
            for p in problems:
                log.warning("pinned map refused: %s; replacing it with a fresh one", p)
            self.replaced = problems
            for name in (*LB_MAPS, *(("meta",) if any("/meta" in p for p in problems) else ())):
                (self.pin_dir / name).unlink(missing_ok=True)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.bpf = bcc.BPF(src_file=str(LB_SOURCE).encode(), cflags=[f'-DL7G_PIN_DIR="{self.pin_dir}"', "-w"])
            for name, (attach_type, _) in HOOKS.items():
                self._fns[name] = self.bpf.load_func(name.encode(), bcc.BPF.CGROUP_SOCK_ADDR,
                                                     attach_type=attach_type)
        except Exception as exc:
            raise DatapathError(f"cannot compile or load the socket load balancer ({LB_SOURCE.name}): {exc}") from None
        meta = self.bpf[b"l7g_meta"]
        v = meta.Leaf()
        v.magic = MAGIC
        v.layout = LAYOUT
        meta[meta.Key(0)] = v
        self._read_back()

    def close(self) -> None:
        """Release this process's program and map fds. Attachments and pins stay (on purpose)."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
            self._fns.clear()

    def uninstall(self) -> None:
        """Detach every l7gate LB program from the attached cgroup and remove the LB's pins
        (tests, teardown); the pin dir goes too when nothing but `meta` is left in it."""
        if self.cgroup is not None:
            detach_all(self.cgroup)
            self.cgroup = None
        self.close()
        for name in LB_MAPS:
            (self.pin_dir / name).unlink(missing_ok=True)
        try:
            if {p.name for p in self.pin_dir.iterdir()} <= {"meta"}:
                (self.pin_dir / "meta").unlink(missing_ok=True)
                self.pin_dir.rmdir()
        except OSError:
            pass
        self._written.clear()
        self._ids.clear()

    # -- attachment -----------------------------------------------------------------------------

    def attach(self, cgroup: Path) -> None:
        """Translate for the sockets of processes in `cgroup` (a cgroup v2 directory) and its
        descendants: connect4, sendmsg4, recvmsg4, getpeername4. Replaces a previous l7gate
        LB attachment there without a gap; attaching again is a no-op."""
        if self.bpf is None:
            raise DatapathError(f"attaching the socket load balancer to {cgroup}: open() it first")
        if not (cgroup / "cgroup.procs").exists():
            raise DatapathError(f"{cgroup} is not a cgroup v2 directory")
        bcc = import_bcc()
        present = {a.prog_id for a in attachments(cgroup)}
        mine: set[int] = set()
        fd = os.open(cgroup, os.O_RDONLY)
        try:
            for name, (attach_type, _) in HOOKS.items():
                fn = self._fns[name]
                prog_id = _prog_id(fn.fd)
                mine.add(prog_id)
                if prog_id in present:
                    continue
                try:
                    bcc.BPF.attach_func(fn, fd, attach_type, BPF_F_ALLOW_MULTI)
                except Exception as exc:
                    raise DatapathError(f"cannot attach {name} to {cgroup}: {exc}") from None
        finally:
            os.close(fd)
        detach_all(cgroup, keep=mine)
        self.cgroup = cgroup

    def detach(self) -> None:
        """Detach this loader's programs from its cgroup (a cgroup that is gone is fine)."""
        if self.cgroup is None or self.bpf is None:
            return
        bcc = import_bcc()
        try:
            fd = os.open(self.cgroup, os.O_RDONLY)
        except FileNotFoundError:
            self.cgroup = None
            return
        try:
            for name, (attach_type, _) in HOOKS.items():
                try:
                    bcc.BPF.detach_func(self._fns[name], fd, attach_type)
                except Exception as exc:  # noqa: BLE001 - bcc raises a bare Exception
                    if "No such file" not in str(exc):
                        raise DatapathError(f"cannot detach {name} from {self.cgroup}: {exc}") from None
        finally:
            os.close(fd)
        self.cgroup = None

    # -- maps -----------------------------------------------------------------------------------

    def _tables(self) -> tuple[Any, Any]:
        if self.bpf is None:
            raise DatapathError(f"the socket load balancer in {self.pin_dir} is not open")
        return self.bpf[b"l7g_lb_services"], self.bpf[b"l7g_lb_backends"]

    def _read_kernel(self) -> tuple[dict[Frontend, tuple[int, int]], dict[int, dict[int, Backend]]]:
        """(frontend -> (count, id), id -> slot -> backend), as the pinned maps hold them."""
        svc_t, be_t = self._tables()
        entries: dict[Frontend, tuple[int, int]] = {}
        for k, v in svc_t.items():
            fe = (_u32_addr(k.vip), socket.ntohs(k.port), _PROTOCOL_NAMES.get(k.proto, str(k.proto)))
            entries[fe] = (int(v.count), int(v.id))
        slots: dict[int, dict[int, Backend]] = {}
        for k, v in be_t.items():
            slots.setdefault(int(k.id), {})[int(k.slot)] = (_u32_addr(v.ip), socket.ntohs(v.port))
        return entries, slots

    def _read_back(self) -> None:
        entries, slots = self._read_kernel()
        self._written.clear()
        for fe, (count, sid) in entries.items():
            have = slots.get(sid, {})
            complete = count == 0 or all(i in have for i in range(count))
            backends = tuple(have[i] for i in range(count)) if complete else None
            self._written[fe] = _Entry(sid if count else 0, count, backends)
            if not complete:
                log.warning("lb_services: %s names %d backend slots under id %d, %d exist; rewriting it "
                            "at the next update", _fe_str(fe), count, sid, len(have))
        self._ids = {e.id for e in self._written.values() if e.id}
        # slots no entry refers to: a writer stopped between writing and switching, or between
        # switching and deleting
        live = {e.id: e.count for e in self._written.values() if e.id}
        _, be_t = self._tables()
        orphans = [(sid, slot) for sid, by_slot in slots.items() for slot in by_slot if slot >= live.get(sid, 0)]
        for sid, slot in orphans:
            try:
                del be_t[be_t.Key(sid, slot)]
            except KeyError:
                pass
        self.repaired = len(orphans)
        if orphans:
            log.info("lb_backends: deleted %d slots no service refers to", len(orphans))
        self._next_id = (max(self._ids) % _ID_MAX) + 1 if self._ids else 1

    def _allocate_id(self) -> int:
        for _ in range(len(self._ids) + 1):
            sid = self._next_id
            self._next_id = sid % _ID_MAX + 1
            if sid not in self._ids:
                self._ids.add(sid)
                return sid
        raise DatapathError("lb_services: no free service id")

    def _delete_slots(self, be_t: Any, sid: int, count: int) -> None:
        for slot in range(count):
            try:
                del be_t[be_t.Key(sid, slot)]
            except KeyError:
                pass
        self._ids.discard(sid)

    def set_services(self, desired: Mapping[Frontend, Sequence[Backend]]) -> int:
        """Make the service maps hold exactly `desired`: (ClusterIP, port, "TCP"|"UDP"|"SCTP")
        -> [(backend address, port)]; an empty list makes connects to the frontend fail with
        EHOSTUNREACH. Only frontends whose backend set differs are written (see the module
        docstring for the order); frontends not in `desired` are deleted, after which their
        address is no longer translated. IPv6 frontends and backends are left out. Returns the
        number of frontends written or deleted."""
        want = _normalise(desired)
        svc_t, be_t = self._tables()
        changes = 0
        for fe in sorted(want, key=_sort_key):
            backends = want[fe]
            cur = self._written.get(fe)
            if cur is not None and cur.backends == backends:
                continue
            vip, port, proto = fe
            key = svc_t.Key(_addr_u32(vip), socket.htons(port), _proto_number(proto), 0)
            sid = self._allocate_id() if backends else 0
            try:
                for slot, (ip, bport) in enumerate(backends):
                    be_t[be_t.Key(sid, slot)] = be_t.Leaf(_addr_u32(ip), socket.htons(bport), 0)
                svc_t[key] = svc_t.Leaf(len(backends), sid)  # the switch
            except Exception as exc:
                if sid:  # slots no entry names yet
                    self._delete_slots(be_t, sid, len(backends))
                raise DatapathError(f"lb_services/lb_backends: cannot write {_fe_str(fe)} with "
                                    f"{len(backends)} backends: {exc}") from None
            self._written[fe] = _Entry(sid, len(backends), backends)
            if cur is not None and cur.id:
                self._delete_slots(be_t, cur.id, cur.count)
            changes += 1
        for fe in sorted(self._written.keys() - want.keys(), key=_sort_key):
            vip, port, proto = fe
            cur = self._written.pop(fe)
            try:
                del svc_t[svc_t.Key(_addr_u32(vip), socket.htons(port), _proto_number(proto), 0)]
            except KeyError:
                pass
            if cur.id:
                self._delete_slots(be_t, cur.id, cur.count)
            changes += 1
        return changes

    def services(self) -> dict[Frontend, list[Backend]]:
        """What the kernel holds now: frontend -> backends in slot order (read from the maps)."""
        entries, slots = self._read_kernel()
        return {fe: [slots.get(sid, {})[i] for i in range(count) if i in slots.get(sid, {})]
                for fe, (count, sid) in sorted(entries.items(), key=lambda kv: _sort_key(kv[0]))}

    def kernel_entries(self) -> dict[Frontend, tuple[int, int]]:
        """Frontend -> (backend count, service id), as lb_services holds them (diagnostics)."""
        entries, _ = self._read_kernel()
        return entries


def _sort_key(fe: Frontend) -> tuple[int, int, str]:
    return (int(ipaddress.IPv4Address(fe[0])), fe[1], fe[2])
