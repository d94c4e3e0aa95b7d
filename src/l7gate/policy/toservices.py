"""Services as `toServices` reads them, and the CIDRs an entry stands for. Pure: no I/O.

A `toServices` entry (egress rules) names Kubernetes Services: `k8sService: {serviceName,
namespace}` by name, or `k8sServiceSelector: {selector, namespace}` by the Service's own labels;
an empty namespace is every namespace (Cilium copies the entry as written, even in a
CiliumNetworkPolicy). Parsing leaves it a `ServicePeer`; `references.expand_policy` replaces it
with what it stands for here, as Cilium's agent does (pkg/policy/k8s/service.go):

- only a Service without a selector is selectable: its endpoints are not pods Kubernetes picked
  by labels but addresses someone else manages (EndpointSlices written by hand or by another
  controller: backends outside the cluster). A Service with a selector selects nothing through
  `toServices` (Cilium's default; it documents `toEndpoints` with the Service's selector for
  those);
- a selected Service stands for one host prefix (`/32`, `/128`) per address of its endpoints
  that are ready or serving, each exactly the `toCIDRSet` entry `{cidr: <address>/32}`: a CIDR
  identity, an ipcache entry, policy map keys, like any written CIDR;
- a Service that does not exist, or has no such endpoint, selects nothing (the rule still counts
  for default-deny) until it has; a change of the Service or of its endpoints changes the
  expansion (the agent expands again).

The caller (the agent, `policy trace`) builds the `ServiceTarget`s from Services and their
EndpointSlices (`k8s.objects.service_targets`); this module never sees a Kubernetes object.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .labels import Labels
from .selector import CIDRSelector, IPNetwork, ServicePeer


def _net_order(n: IPNetwork) -> tuple[int, bytes]:
    return (n.version, n.network_address.packed)


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """A Service as `toServices` sees it: its namespace, name and metadata labels, whether it
    has a selector (then it is not selectable), and the host prefixes of its ready or serving
    endpoints (sorted, unique). Immutable."""

    namespace: str
    name: str
    labels: Labels = Labels()
    has_selector: bool = False
    addresses: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, namespace: str, name: str, labels: Mapping[str, str], *, has_selector: bool,
           addresses: Iterable[str]) -> ServiceTarget:
        """From plain values; each address (a string) becomes its host prefix."""
        nets = {ipaddress.ip_network(a) for a in addresses}
        return cls(namespace, name, Labels.of(labels), has_selector, tuple(sorted(nets, key=_net_order)))

    @property
    def key(self) -> str:
        """`namespace/name`, the key of the mappings this module reads."""
        return f"{self.namespace}/{self.name}"

    @property
    def selectable(self) -> bool:
        """Whether a `toServices` entry can select it at all (no selector, as in Cilium)."""
        return not self.has_selector


def named_services(peer: ServicePeer, services: Mapping[str, ServiceTarget]) -> list[ServiceTarget]:
    """Every Service `peer` names, selectable or not, by `namespace/name` (for explanations)."""
    return [t for _, t in sorted(services.items()) if peer.selects_service(t.namespace, t.name, t.labels)]


def selected_services(peer: ServicePeer, services: Mapping[str, ServiceTarget]) -> list[ServiceTarget]:
    """The Services `peer` selects: those it names that have no selector."""
    return [t for t in named_services(peer, services) if t.selectable]


def service_selectors(peer: ServicePeer, services: Mapping[str, ServiceTarget]) -> list[CIDRSelector]:
    """The CIDR selectors `peer` stands for with `services` in force (`namespace/name` →
    target): one host prefix per endpoint address of the Services it selects, by key."""
    out = {sel.key: sel for t in selected_services(peer, services) for sel in (CIDRSelector(a) for a in t.addresses)}
    return [out[k] for k in sorted(out)]
