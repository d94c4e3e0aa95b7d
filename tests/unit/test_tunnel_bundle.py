"""Tunnels publishes a new trust bundle to Envoy as soon as the store sees it (a CA rotation
does not wait for the next SVID rotation)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message

from l7gate.xds.tunnel import Tunnels
from l7gate.xds.tunnel_plan import TunnelPlan
from l7gate.mtls.ca import BuiltinCA
from l7gate.mtls.store import SVIDStore
from l7gate.testing.mtls import StaticSource
from l7gate.policy.mapstate import Action, Decision
from l7gate.policy.types import AuthMode
from l7gate.xds import mtls_translate as mt
from l7gate.xds.cache import SECRET, Snapshot, SnapshotCache, SnapshotDelta
from l7gate.xds.rbac import PortDecisions

TD = "l7gate.local"


class Sink:
    """A snapshot cache that remembers, per type, what each `apply` upserted."""

    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.updates: list[tuple[str, dict[str, Message]]] = []

    def apply(self, node_id: str, delta: SnapshotDelta) -> Snapshot:
        self.updates += [(t, dict(delta.upserted.get(t, {}))) for t in sorted(delta.types)]
        return self.cache.apply(node_id, delta)


def test_a_new_bundle_is_published_over_sds_at_once(tmp_path: Path) -> None:
    ca, new_root = BuiltinCA.ephemeral(TD), BuiltinCA.ephemeral(TD)
    source = StaticSource(TD, ca.bundle(), {2002: ca.issue(2002)})
    store = SVIDStore(source, tmp_path)
    store.set_identities([2002])
    sink = Sink()
    tunnels = Tunnels(sink, "n", store, "10.0.1.1", 15443, set_kernel=lambda k: None,
                      listeners_acked=lambda v, t: True)
    try:
        # Before any tunnel secret is published, a bundle change publishes nothing.
        source._bundle = [*ca.bundle(), *new_root.bundle()]
        store.refresh()
        assert sink.updates == []
        source._bundle = ca.bundle()
        store.refresh()

        allow = Decision(Action.ALLOW, auth=AuthMode.REQUIRED, policies=("p",))
        plan = TunnelPlan({("10.0.1.10", 9000): PortDecisions(Decision(Action.DENY), {1001: allow})},
                          frozenset({2002}), {}, frozenset())
        tunnels.apply(plan)
        n = len(sink.updates)
        source._bundle = [*ca.bundle(), *new_root.bundle()]
        store.refresh()
        new = sink.updates[n:]
        assert [t for t, _ in new] == [SECRET]
        secret = new[0][1][mt.bundle_secret_name(TD)]
        assert secret.validation_context.trusted_ca.inline_bytes == store.bundle_pem()
        assert new_root.certificate.public_bytes(serialization.Encoding.PEM) in store.bundle_pem()
    finally:
        tunnels.stop()
