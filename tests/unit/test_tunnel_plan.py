"""Which connections go through the mTLS tunnel: the source node's plan (which does not hold
the destination's resolved policy) must agree with the destination node's kernel flags (which
do), or a connection would be sent in plain text and refused, or tunnelled and refused."""

from __future__ import annotations

import random
from typing import Any

from l7gate.xds.tunnel_plan import PodView, TunnelInputs, plan
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.mapstate import PortView, tunnel_needed, tunnel_tcp
from l7gate.policy.resolve import Resolver
from l7gate.policy.types import Direction, Protocol
from l7gate.redirect_bpf.compile import KFlag, compile_endpoint

FE, BILL, OTHER = 131072, 65536, 131073


def labels(app: str, ns: str = "ns") -> Labels:
    return Labels.of({"app": app, "io.kubernetes.pod.namespace": ns})


IDS = {FE: labels("fe"), BILL: labels("billing"), OTHER: labels("other")}


def ccnp(name: str, ingress: list[dict[str, Any]], deny: list[dict[str, Any]] | None = None,
         subject: str = "billing") -> Any:
    spec: dict[str, Any] = {"endpointSelector": {"matchLabels": {"app": subject}}, "ingress": ingress}
    if deny:
        spec["ingressDeny"] = deny
    return parse_policy({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                         "metadata": {"name": name}, "spec": spec})


def rule(app: str, port: str, *, http: bool = True, auth: bool = True, end: int | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"port": port, "protocol": "TCP"}
    if end is not None:
        p["endPort"] = end
    tp: dict[str, Any] = {"ports": [p]}
    if http:
        tp["rules"] = {"http": [{"method": "POST", "path": "/v1/charge"}]}
    r: dict[str, Any] = {"fromEndpoints": [{"matchLabels": {"app": app}}], "toPorts": [tp]}
    if auth:
        r["authentication"] = {"mode": "required"}
    return r


POLICIES = (
    ccnp("http-auth", [rule("fe", "8080")]),
    # deny wins: no tunnel
    ccnp("denied", [rule("fe", "9090")], deny=[{"fromEndpoints": [{"matchLabels": {"app": "fe"}}],
                                                "toPorts": [{"ports": [{"port": "9090"}]}]}]),
    # auth on an L3/L4 allow: the TCP variant (CONNECT)
    ccnp("l4-auth", [rule("fe", "7070", http=False)]),
    # a port range (L3/L4 only: HTTP rules need a single port) with auth: the TCP variant, for
    # the ports the destination pod declares in it
    ccnp("range", [rule("fe", "8100", end=8200, http=False)]),
    # an L4 allow on the same port makes the HTTP rules moot: an L3/L4 allow, still with the
    # auth the other rule asks for, so the TCP variant
    ccnp("moot", [rule("fe", "6060"), rule("fe", "6060", http=False, auth=False)]),
    # an L4 allow without auth: no tunnel
    ccnp("l4-plain", [rule("fe", "5050", http=False, auth=False)]),
    # no auth: no tunnel
    ccnp("no-auth", [rule("other", "8080", auth=False)]),
)


def source_view(policies: tuple[Any, ...], bill_ports: tuple[int, ...]) -> TunnelInputs:
    """Node B: the frontend and `other` are local, billing is on node A."""
    r = Resolver()
    for p in policies:
        r.upsert_policy(p)
    r.update_identities(IDS)
    for ident in (FE, OTHER):
        r.add_endpoint(ident)
    pods = (
        PodView(FE, IDS[FE], "10.0.2.10", True, ()),
        PodView(OTHER, IDS[OTHER], "10.0.2.11", True, ()),
        PodView(BILL, IDS[BILL], "10.0.1.10", False, bill_ports, "a1", "10.0.1.1"),
    )
    return TunnelInputs(pods, policies, IDS, r.endpoint_policy)


def destination_policy(policies: tuple[Any, ...]) -> Any:
    """Node A: billing is local; its full resolved policy."""
    r = Resolver()
    for p in policies:
        r.upsert_policy(p)
    r.update_identities(IDS)
    r.add_endpoint(BILL)
    return r.endpoint_policy(BILL)


def test_source_plan() -> None:
    p = plan(source_view(POLICIES, (8080, 8150, 9090, 7070, 6060, 5050)))
    assert p.kernel == {(FE, BILL, 6, port) for port in (8080, 8150, 7070, 6060)}
    assert set(p.egress) == {("10.0.1.10", port) for port in (8080, 8150, 7070, 6060)}
    eg = p.egress[("10.0.1.10", 8080)]
    assert eg.remote.identity == BILL and eg.remote.node_ip == "10.0.1.1"
    assert dict(eg.sources) == {FE: ("10.0.2.10",)}
    assert eg.tcp_sources == set()  # HTTP rules: the HTTP variant
    for port in (8150, 7070, 6060):  # L3/L4 allows: the TCP variant
        assert p.egress[("10.0.1.10", port)].tcp_sources == {FE}
    assert not p.ingress  # nothing local needs it


def test_destination_plan_lists_the_ports_that_need_the_tunnel() -> None:
    pol = destination_policy(POLICIES)
    r = Resolver()
    for x in POLICIES:
        r.upsert_policy(x)
    r.update_identities(IDS)
    r.add_endpoint(BILL)
    pods = (PodView(BILL, IDS[BILL], "10.0.1.10", True, (8080, 9090, 7070, 5050)),
            PodView(FE, IDS[FE], "10.0.2.10", False, (), "b1", "10.0.2.1"))
    p = plan(TunnelInputs(pods, POLICIES, IDS, r.endpoint_policy))
    # 6060 is not declared: a single port an auth rule names is accepted all the same.
    assert set(p.ingress) == {("10.0.1.10", 8080), ("10.0.1.10", 7070), ("10.0.1.10", 6060)}
    assert p.ingress_identities == {BILL}
    assert p.ingress[("10.0.1.10", 8080)].for_identity(FE).auth_required
    assert pol is not None


def test_kernel_flags_tunnel_only_on_ingress_allows_with_auth_it_can_carry() -> None:
    pol = destination_policy(POLICIES)
    on = compile_endpoint(pol, tunnel=True)
    off = compile_endpoint(pol, tunnel=False)
    assert not any(v.flags & KFlag.TUNNEL for v in off.values())
    flagged = {k for k, v in on.items() if v.flags & KFlag.TUNNEL}
    assert flagged and all(k.direction == 0 and k.peer == FE and k.proto == 6 for k in flagged)
    covered = {port for k in flagged for port in range(k.port, k.last_port + 1)}
    assert {8080, 7070, 6060} | set(range(8100, 8201)) <= covered
    assert not covered & {9090, 5050}
    # Apart from the flag, the entries are the same.
    assert {k: v.action for k, v in on.items()} == {k: v.action for k, v in off.items()}


def test_both_ends_agree_on_random_policies() -> None:
    """The source's plan (rule scan + a resolver of the policies selecting the destination)
    equals the destination's own decisions (`tunnel_needed` on its full map) for every
    (source, port)."""
    rnd = random.Random(6)
    apps = ["fe", "other"]
    for _ in range(60):
        pols = []
        for i in range(rnd.randint(1, 5)):
            ingress = []
            for _ in range(rnd.randint(1, 3)):
                port = rnd.choice(["8080", "8050", "9090", "8000"])
                ranged = port == "8000"
                ingress.append(rule(rnd.choice(apps), port, http=not ranged and rnd.random() < 0.7,
                                    auth=rnd.random() < 0.6, end=8100 if ranged else None))
            deny = None
            if rnd.random() < 0.2:
                deny = [{"fromEndpoints": [{"matchLabels": {"app": rnd.choice(apps)}}],
                         "toPorts": [{"ports": [{"port": rnd.choice(["8080", "9090"])}]}]}]
            pols.append(ccnp(f"p{i}", ingress, deny, subject=rnd.choice(["billing", "billing", "fe"])))
        policies = tuple(pols)
        ports = (8080, 8050, 9090)
        got = plan(source_view(policies, ports)).kernel
        dest = destination_policy(policies)
        want = {
            (src, BILL, 6, port)
            for src in (FE, OTHER) for port in ports
            if tunnel_needed(PortView(dest, Direction.INGRESS, port, Protocol.TCP).decide(src))
        }
        assert got == want, [p.name for p in policies]


def test_udp_under_auth_stays_on_the_handshake_path() -> None:
    """The tunnel carries TCP only: an auth-required L3/L4 allow over UDP (or any protocol's
    UDP part) is not flagged, so UDP from another node is judged by the auth map as before."""
    any_proto = ccnp("any", [{"fromEndpoints": [{"matchLabels": {"app": "fe"}}],
                              "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}]}],
                              "authentication": {"mode": "required"}}])
    on = compile_endpoint(destination_policy((any_proto,)), tunnel=True)
    by_proto = {k.proto for k, v in on.items() if v.flags & KFlag.TUNNEL}
    assert by_proto == {6}
    assert any(k.proto == 17 and v.flags & KFlag.AUTH and k.peer == FE for k, v in on.items())


def test_both_ends_agree_on_the_variant() -> None:
    """Each tunnelled (source, port) takes the variant the destination's decision calls for:
    TCP exactly where the decision is an L3/L4 allow."""
    rnd = random.Random(7)
    for _ in range(40):
        ingress = [rule(rnd.choice(["fe", "other"]), rnd.choice(["8080", "9090"]),
                        http=rnd.random() < 0.5, auth=rnd.random() < 0.7) for _ in range(rnd.randint(1, 4))]
        policies = (ccnp("p", ingress),)
        p = plan(source_view(policies, (8080, 9090)))
        dest = destination_policy(policies)
        for (ip, port), eg in p.egress.items():
            for src in eg.sources:
                d = PortView(dest, Direction.INGRESS, port, Protocol.TCP).decide(src)
                assert (src in eg.tcp_sources) == tunnel_tcp(d), (ingress, port, src)


def test_destination_accepts_every_port_the_source_tunnels_declared_or_not() -> None:
    """The source tunnels a rule's single ports whatever the destination pod declares; the
    destination's tunnel route must list them, or the tunnelled connection would be refused
    as a relay to a port that is not its own."""
    rnd = random.Random(8)
    for _ in range(40):
        ingress = [rule(rnd.choice(["fe", "other"]), rnd.choice(["8080", "9090", "7070"]),
                        http=rnd.random() < 0.5, auth=rnd.random() < 0.7) for _ in range(rnd.randint(1, 4))]
        policies = (ccnp("p", ingress),)
        declared = tuple(x for x in (8080, 9090) if rnd.random() < 0.5)
        src = plan(source_view(policies, declared))
        r = Resolver()
        for x in policies:
            r.upsert_policy(x)
        r.update_identities(IDS)
        r.add_endpoint(BILL)
        pods = (PodView(BILL, IDS[BILL], "10.0.1.10", True, declared),
                PodView(FE, IDS[FE], "10.0.2.10", False, (), "b1", "10.0.2.1"),
                PodView(OTHER, IDS[OTHER], "10.0.2.11", False, (), "b1", "10.0.2.1"))
        dst = plan(TunnelInputs(pods, policies, IDS, r.endpoint_policy))
        assert {("10.0.1.10", k[3]) for k in src.kernel} <= set(dst.ingress), (ingress, declared)


def test_an_address_two_local_identities_share_gets_no_tunnel() -> None:
    """Host-network pods share the node's address: the source address cannot say whose
    certificate to present, so neither gets a tunnel source entry for it."""
    view = source_view(POLICIES, (8080,))
    shared = (PodView(OTHER, IDS[OTHER], "10.0.2.10", True, ()),)  # FE's address, another identity
    p = plan(TunnelInputs(view.pods + shared, view.policies, view.identities, view.policy_of))
    for eg in p.egress.values():
        assert all("10.0.2.10" not in addrs for addrs in eg.sources.values())


def test_a_named_port_under_auth_is_tunnelled_on_the_number_the_destination_declares() -> None:
    """The source node resolves the destination's named port from its pods (the agent's named
    ports of that identity) and tunnels exactly the port the destination node flags."""
    from l7gate.policy.namedports import NamedPorts

    policies = (ccnp("named", [rule("fe", "http")]), ccnp("named-l4", [rule("fe", "admin", http=False)]))
    named = {BILL: NamedPorts.of([("http", 8443, "TCP"), ("admin", 9443, "TCP")])}
    src = source_view(policies, (8443, 9443))
    p = plan(TunnelInputs(src.pods, src.policies, src.identities, src.policy_of, named))
    assert p.kernel == {(FE, BILL, 6, 8443), (FE, BILL, 6, 9443)}
    assert p.egress[("10.0.1.10", 9443)].tcp_sources == {FE} and not p.egress[("10.0.1.10", 8443)].tcp_sources
    assert not plan(src).kernel  # without the destination's named ports: nothing resolves, nothing tunnelled
    r = Resolver()
    for x in policies:
        r.upsert_policy(x)
    r.update_identities(IDS)
    r.update_named_ports(named)
    r.add_endpoint(BILL)
    flagged = {(k.port, k.last_port) for k, v in compile_endpoint(r.endpoint_policy(BILL), tunnel=True).items()  # type: ignore[arg-type]
               if v.flags & KFlag.TUNNEL}
    assert flagged == {(8443, 8443), (9443, 9443)}
