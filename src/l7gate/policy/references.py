"""Peers that name other objects, and policies expanded with the objects in force. Pure: no I/O.

Two kinds of peer entry name objects that change while the policy does not: a `cidrGroupRef`/
`cidrGroupSelector` entry (`CIDRGroupPeer`) names CiliumCIDRGroups, a `toServices` entry
(`ServicePeer`) names Services. Parsing leaves them unresolved (they select nothing by
themselves). Before a policy is resolved, `expand_policy` replaces each with the CIDR selectors
it stands for with the objects in force — a group's CIDRs with the entry's `except` ranges
(`cidrgroup.group_selectors`), a Service's endpoint addresses (`toservices.service_selectors`) —
so that from there on the policy is made of the selectors `toCIDRSet` gives, and the objects'
addresses become CIDR identities, ipcache entries, BPF map keys and Envoy source ranges exactly
as written-out CIDRs do.

Theory of operation, in the agent: it keeps each policy with references as parsed
(`references` says which) and hands the resolver the expansion. When a group, a Service or a
Service's endpoints change, it expands those policies again and upserts the ones whose
expansion changed, in one resolver change (the path a policy update takes). A rule whose
references select nothing selects no peer — never every peer — and still counts for
default-deny.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from . import cidrgroup, toservices
from .cidrgroup import CIDRGroup
from .selector import CIDRGroupPeer, PeerSelector, ServicePeer
from .toservices import ServiceTarget
from .types import PeerRule, Policy, Rule

_NO_SERVICES: Mapping[str, ServiceTarget] = {}


def _peers(policy: Policy) -> list[PeerSelector]:
    return [p for r in policy.rules for pr in r.rules for p in pr.peers or ()]


def references_groups(policy: Policy) -> bool:
    """Whether `policy` has a `cidrGroupRef` or `cidrGroupSelector` entry."""
    return any(isinstance(p, CIDRGroupPeer) for p in _peers(policy))


def references_services(policy: Policy) -> bool:
    """Whether `policy` has a `toServices` entry."""
    return any(isinstance(p, ServicePeer) for p in _peers(policy))


def references(policy: Policy) -> bool:
    """Whether `policy` names groups or Services: its expansion depends on them."""
    return any(isinstance(p, (CIDRGroupPeer, ServicePeer)) for p in _peers(policy))


def resolve(peer: PeerSelector, groups: Mapping[str, CIDRGroup],
            services: Mapping[str, ServiceTarget] = _NO_SERVICES) -> list[PeerSelector]:
    """What `peer` stands for: a reference's CIDR selectors, any other peer itself."""
    if isinstance(peer, CIDRGroupPeer):
        return list(cidrgroup.group_selectors(peer, groups))
    if isinstance(peer, ServicePeer):
        return list(toservices.service_selectors(peer, services))
    return [peer]


def expand_policy(policy: Policy, groups: Mapping[str, CIDRGroup],
                  services: Mapping[str, ServiceTarget] = _NO_SERVICES) -> Policy:
    """`policy` with each reference replaced by the CIDR selectors it stands for with `groups`
    (name → group) and `services` (`namespace/name` → target) in force (module doc). A policy
    without references is returned as it is."""
    if not references(policy):
        return policy
    return replace(policy, rules=tuple(_expand_rule(r, groups, services) for r in policy.rules))


def _expand_rule(rule: Rule, groups: Mapping[str, CIDRGroup], services: Mapping[str, ServiceTarget]) -> Rule:
    return replace(rule, rules=tuple(_expand_peer_rule(pr, groups, services) for pr in rule.rules))


def _expand_peer_rule(pr: PeerRule, groups: Mapping[str, CIDRGroup],
                      services: Mapping[str, ServiceTarget]) -> PeerRule:
    if pr.peers is None or not any(isinstance(p, (CIDRGroupPeer, ServicePeer)) for p in pr.peers):
        return pr
    peers: dict[str, PeerSelector] = {}
    for p in pr.peers:
        for sel in resolve(p, groups, services):
            peers.setdefault(sel.key, sel)
    return replace(pr, peers=tuple(peers[k] for k in sorted(peers)))
