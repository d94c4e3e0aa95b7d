"""Linux socket options of the transparent DNS proxy, and the ancillary data it reads and writes.

Measured on Linux (the privileged test does it again), for a query delivered to the node by
``ip rule fwmark M lookup T`` + ``ip route add local 0.0.0.0/0 dev lo table T`` — the packet
keeps its destination, e.g. the cluster resolver's 10.96.0.10:53:

- A UDP or TCP socket bound to the wildcard address and port 53 receives it; a UDP socket with
  IP_RECVORIGDSTADDR learns the destination of each datagram (`orig_dst`); an accepted TCP
  socket's getsockname() is the destination.
- The answer must come from that destination. UDP: ``sendmsg`` on the listening socket with an
  IP_PKTINFO control message whose ``ipi_spec_dst`` is the resolver's address (`source_cmsg`);
  the source port is the socket's (53). Without IP_TRANSPARENT on the socket the kernel
  refuses a non-local source (ENETUNREACH); with it the route lookup allows any source
  (FLOWI_FLAG_ANYSRC). A second socket bound to (resolver, 53) would also work, but it would
  take over the next queries to that address: the listener must stay the only receiver.
- TCP: without IP_TRANSPARENT on the listener the SYN-ACK cannot leave from the non-local
  address and the handshake never completes; with it, the accepted socket speaks from the
  resolver's address.

IPv6 has the same options under SOL_IPV6. Python 3.11's socket module lacks some of them,
hence the numbers from <linux/in.h> and <linux/in6.h>.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

IP_PKTINFO = 8
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20  # the control message comes back as IP_ORIGDSTADDR, the same number
IP_ORIGDSTADDR = 20
IPV6_PKTINFO = 50
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = 74
IPV6_TRANSPARENT = 75
SOL_IP = 0
SOL_IPV6 = 41
SO_MARK = 36
SO_RCVBUFFORCE = 33

CMSG_BUFFER = socket.CMSG_SPACE(28) * 2  # room for one sockaddr_in6 (and a spare)


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def set_transparent(sock: socket.socket) -> None:
    """IP(V6)_TRANSPARENT: receive for, and speak from, addresses that are not the node's."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def set_recv_orig_dst(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)


def orig_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The destination (ip, port) of a datagram from its IP(V6)_ORIGDSTADDR control message."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            (family,) = struct.unpack_from("=H", data)
            if family == socket.AF_INET:
                (port,) = struct.unpack_from("!H", data, 2)
                return socket.inet_ntop(socket.AF_INET, data[4:8]), port
        if level == SOL_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            (family,) = struct.unpack_from("=H", data)
            if family == socket.AF_INET6:
                (port,) = struct.unpack_from("!H", data, 2)
                return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


def source_cmsg(ip: str) -> tuple[int, int, bytes]:
    """The control message making `sendmsg` send from `ip` (struct in_pktinfo / in6_pktinfo,
    interface 0: the route decides)."""
    if family_of(ip) == socket.AF_INET6:
        return SOL_IPV6, IPV6_PKTINFO, struct.pack("=16sI", socket.inet_pton(socket.AF_INET6, ip), 0)
    return SOL_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, socket.inet_pton(socket.AF_INET, ip), bytes(4))


def set_mark(sock: socket.socket, mark: int) -> None:
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    """A receive buffer for bursts of queries: forced past net.core.rmem_max where allowed
    (CAP_NET_ADMIN), else as large as the sysctl lets an unprivileged process have it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def bind_listeners(ip: str, port: int, *, transparent: bool, rcvbuf: int, backlog: int = 1024
                   ) -> tuple[socket.socket, socket.socket]:
    """(UDP, TCP) non-blocking sockets on ip:port; port 0: one free port for both."""
    family = family_of(ip)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for sock in (tcp, udp):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if transparent:
                set_transparent(sock)
        tcp.bind((ip, port))
        tcp.listen(backlog)
        set_recv_orig_dst(udp)
        set_rcvbuf(udp, rcvbuf)
        udp.bind((ip, tcp.getsockname()[1]))
        for sock in (tcp, udp):
            sock.setblocking(False)
    except BaseException:
        tcp.close()
        udp.close()
        raise
    return udp, tcp
