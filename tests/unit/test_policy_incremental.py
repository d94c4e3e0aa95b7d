"""Policy changes on endpoints that share templates: the resolver's incremental path.

A policy upsert, replace or delete changes an endpoint's map by the rules that left or joined
its rule set only (`Resolver._recompute_endpoint`), and endpoints selected by the same rules
share one template. After every operation of a generated sequence — mostly policy upserts
(same names, so most are replacements) and deletes, with relabels that move endpoints between
shared templates, new and deleted peers, endpoints added and removed, and batches of policies
upserted as one change (`Resolver.upsert_policies`, what an apply of a file does) — this checks:

Named container ports come and go too (a pod declares, drops or moves `http`), so that rules
with named ports re-resolve on their endpoints (ingress) and peers (egress).

- every endpoint's maps, default-deny and policies equal those of a resolver built from
  scratch on the same state;
- the deltas, replayed from the maps before the sequence, give the maps after each step;
- an endpoint whose policies or default-deny changed is in the delta (appliers recompile only
  the endpoints a delta names);
- snapshots iterate in key order, the index of auth-required entries matches the maps, and
  endpoints with the same selecting rules hold the same template.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, note
from hypothesis import strategies as st

from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.policy.types import AuthMode, Direction
from tests.unit import strategies as gen
from tests.unit.test_policy_properties import (
    Maps,
    Model,
    apply_delta,
    apply_op,
    as_json,
    build_resolver,
    examples,
    maps_of,
    snapshot,
)

# Few distinct label sets over many pods: endpoints share their selecting rules, so templates.
SHARED_LABELS: tuple[dict[str, str], ...] = (
    {"app": "billing", "team": "red", "env": "prod", "io.kubernetes.pod.namespace": "payments"},
    {"app": "billing", "team": "blue", "env": "prod", "io.kubernetes.pod.namespace": "payments"},
    {"app": "frontend", "team": "red", "env": "dev", "io.kubernetes.pod.namespace": "web"},
)
PODS = gen.POD_IDS[:7]
NS = "io.kubernetes.pod.namespace"


def _labels() -> st.SearchStrategy[dict[str, str]]:
    return st.sampled_from(SHARED_LABELS) | gen.pod_labels()


@st.composite
def shared_template_sequences(draw: st.DrawFn) -> dict[str, Any]:
    identities: dict[str, dict[str, str]] = {str(gen.WORLD_ID): dict(gen.RESERVED_IDENTITIES[gen.WORLD_ID])}
    for ident in PODS:
        identities[str(ident)] = dict(draw(st.sampled_from(SHARED_LABELS)))
    endpoints = sorted(draw(st.sets(st.sampled_from(PODS[:5]), min_size=3)))
    hints = list(SHARED_LABELS)
    setup: list[dict[str, Any]] = [{"op": "identities", "upserted": identities, "deleted": []}]
    setup.append({"op": "named_ports", "named_ports": {str(i): draw(gen.container_ports()) for i in PODS}})
    setup += [{"op": "upsert_policy", "doc": d}
              for d in draw(st.lists(gen.policy_docs(hints=hints), min_size=1, max_size=3))]
    setup += [{"op": "add_endpoint", "id": e} for e in endpoints]
    ops: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = gen.weighted(draw, [(8, "upsert_policy"), (3, "upsert_policies"), (3, "delete_policy"),
                                   (2, "relabel"), (1, "peer"), (1, "add_endpoint"),
                                   (1, "remove_endpoint"), (1, "recompute_all"), (2, "named_ports")])
        if kind == "upsert_policy":
            ops.append({"op": kind, "doc": draw(gen.policy_docs(hints=hints))})
        elif kind == "upsert_policies":
            # Several at once (an apply of a file): replacements, new names and the same name twice.
            ops.append({"op": kind, "docs": draw(st.lists(gen.policy_docs(hints=hints), min_size=2, max_size=5))})
        elif kind == "delete_policy":
            ops.append({"op": kind, "key": draw(gen.policy_keys())})
        elif kind == "relabel":
            ident = draw(st.sampled_from(PODS))
            ops.append({"op": "identities", "upserted": {str(ident): draw(_labels())}, "deleted": []})
        elif kind == "peer":
            ident = draw(st.sampled_from(gen.POD_IDS[5:]))
            if draw(st.booleans()):
                ops.append({"op": "identities", "upserted": {str(ident): draw(_labels())}, "deleted": []})
            else:
                ops.append({"op": "identities", "upserted": {}, "deleted": [ident]})
        elif kind == "named_ports":
            ident = draw(st.sampled_from(gen.POD_IDS[:8]))
            ops.append({"op": kind, "named_ports": {str(ident): draw(gen.container_ports())}})
        elif kind in ("add_endpoint", "remove_endpoint"):
            ops.append({"op": kind, "id": draw(st.sampled_from(PODS))})
        else:
            ops.append({"op": kind})
    return {
        "cluster_name": gen.LOCAL_CLUSTER,
        "default_namespace": gen.DEFAULT_NAMESPACE,
        "setup": setup,
        "ops": ops,
    }


def check_invariants(r: Resolver) -> None:
    by_rules: dict[frozenset[tuple[str, str]], int] = {}
    for e in r.endpoints():
        p = r.endpoint_policy(e)
        assert p is not None
        for d in Direction:
            keys = list(p.entries(d))
            assert keys == sorted(keys), f"endpoint {e} {d.value}: snapshot out of key order"
            wanted = [(k, v) for k, v in p.entries(d).items() if not v.deny and v.auth is AuthMode.REQUIRED]
            assert r.auth_required(e, d) == wanted, f"endpoint {e} {d.value}: auth index out of date"
        t = r._endpoints[e].template
        assert t.rids == r._selecting_rules(e), f"endpoint {e} holds a stale template"
        first = by_rules.setdefault(t.rids, e)
        assert r._endpoints[first].template is t, f"endpoints {first} and {e}: same rules, two templates"
        assert r._templates.get(t.rids) is t, f"endpoint {e}: its template is not the cached one"
        assert e in r._template_endpoints[t.rids]
    for rids, eps in r._template_endpoints.items():
        assert eps, f"template {sorted(rids)} kept without endpoints"
        for e in eps:
            assert r._endpoints[e].template.rids == rids


def check_sequence(case: dict[str, Any]) -> None:
    ns, cluster = case["default_namespace"], case["cluster_name"]
    r = Resolver()
    model = Model()
    for op in case["setup"]:
        apply_op(r, model, op, default_namespace=ns, cluster_name=cluster)
    applied: Maps = maps_of(r)
    for i, op in enumerate(case["ops"]):
        before = snapshot(r)
        delta = apply_op(r, model, op, default_namespace=ns, cluster_name=cluster)
        after = snapshot(r)
        if delta is not None:
            apply_delta(applied, delta)
            for e, now in after.items():
                was = before.get(e)
                if was is not None and was[:3] != now[:3]:
                    assert e in delta.changes, (
                        f"op {i}: endpoint {e} changed policies/default-deny {was[:3]} -> {now[:3]} "
                        f"but is not in the delta"
                    )
        assert applied == maps_of(r), f"op {i} ({op['op']}): delta replay differs from the maps"
        fresh = snapshot(build_resolver(model.identities, model.endpoints, model.policies,
                                        named_ports=model.named_ports))
        assert after == fresh, f"op {i} ({op['op']}): incremental maps differ from a fresh resolver"
        check_invariants(r)
    assert r.recompute_all().empty


@examples(150)
@given(shared_template_sequences())
def test_policy_changes_on_shared_templates(case: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/incremental/):\n" + as_json(case))
    check_sequence(case)


def _ccnp(name: str, spec: dict[str, Any]) -> Any:
    return parse_policy(
        {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
         "metadata": {"name": name}, "spec": spec}
    )


def _allow(name: str, team: str, path: str) -> Any:
    return _ccnp(name, {
        "endpointSelector": {"matchLabels": {"app": "billing"}},
        "ingress": [{
            "fromEndpoints": [{"matchLabels": {"team": team}}],
            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                         "rules": {"http": [{"method": "GET", "path": path}]}}],
        }],
    })


def test_toggled_policy_changes_only_its_keys_on_every_sharing_endpoint() -> None:
    """bench_envoy's toggle, small: a policy replaced under the same name touches the keys of
    its own peers, on every endpoint of the shared template, and nothing else."""
    r = Resolver()
    billing = {1001: {"app": "billing", "v": "1"}, 1002: {"app": "billing", "v": "2"}}
    peers = {2000 + i: {"team": f"t{i % 5}", "peer": str(i), NS: "web"} for i in range(50)}
    r.update_identities({i: Labels.of(lab) for i, lab in {**billing, **peers}.items()})
    for g in range(5):
        r.upsert_policy(_allow(f"group-{g}", f"t{g}", f"/v1/api/{g}"))
    r.add_endpoint(1001)
    r.add_endpoint(1002)
    assert r._endpoints[1001].template is r._endpoints[1002].template
    r.upsert_policy(_allow("toggle", "t0", "/v1/probe"))
    before = {e: dict(r.endpoint_policy(e).ingress) for e in (1001, 1002)}  # type: ignore[union-attr]
    delta = r.upsert_policy(_allow("toggle", "t0", "/v1/other"))
    t0 = {i for i, lab in peers.items() if lab["team"] == "t0"}
    assert set(delta.changes) == {1001, 1002}
    for e in (1001, 1002):
        dd = delta.changes[e][Direction.INGRESS]
        assert {k.peer for k in dd.upserted} == t0 and not dd.deleted
        now = r.endpoint_policy(e)
        assert now is not None
        for k, entry in now.ingress.items():
            paths = {h.path for h in entry.l7.http} if entry.l7 else set()
            if k.peer in t0:
                assert "/v1/other" in paths and "/v1/probe" not in paths
            else:
                assert entry == before[e][k]
    assert r._endpoints[1001].template is r._endpoints[1002].template
    delta = r.delete_policy("CiliumClusterwideNetworkPolicy/toggle")
    for e in (1001, 1002):
        assert {k.peer for k in delta.changes[e][Direction.INGRESS].upserted} == t0
    assert r.recompute_all().empty


def test_default_deny_alone_reaches_the_delta() -> None:
    """A policy that only turns default-deny on (`ingress: [{}]`) changes no map key; the
    endpoint must still be in the delta, or appliers keep allowing everything."""
    r = Resolver()
    r.update_identities({1001: Labels.of({"app": "billing"})})
    r.add_endpoint(1001)
    delta = r.upsert_policy(_ccnp("deny-all", {"endpointSelector": {}, "ingress": [{}]}))
    assert 1001 in delta.changes
    pol = r.endpoint_policy(1001)
    assert pol is not None and pol.default_deny_ingress and not pol.ingress
    delta = r.delete_policy("CiliumClusterwideNetworkPolicy/deny-all")
    assert 1001 in delta.changes
    pol = r.endpoint_policy(1001)
    assert pol is not None and not pol.policies


def test_replaced_policy_reuses_its_peer_selector() -> None:
    """Replacing a policy keeps the selectors the new version still uses cached: the selector
    cache does not re-match every identity for them."""
    r = Resolver()
    r.update_identities({1001: Labels.of({"app": "billing"}), 2001: Labels.of({"team": "t0", NS: "web"})})
    r.add_endpoint(1001)
    r.upsert_policy(_allow("toggle", "t0", "/v1/probe"))
    key = next(k for k in r.cache._selectors if "t0" in k)
    cached = r.cache._selectors[key]
    r.upsert_policy(_allow("toggle", "t0", "/v1/other"))
    assert r.cache._selectors[key] is cached
    assert r.endpoint_policy(1001).ingress  # type: ignore[union-attr]
    r.delete_policy("CiliumClusterwideNetworkPolicy/toggle")
    assert key not in r.cache


@st.composite
def selector_cache_cases(draw: st.DrawFn) -> dict[str, Any]:
    docs = draw(st.lists(gen.policy_docs(hints=list(SHARED_LABELS)), min_size=1, max_size=4))
    pool = (*gen.POD_IDS, gen.WORLD_ID, gen.HOST_ID, gen.CIDR_ID_BASE)
    steps = []
    for _ in range(draw(st.integers(1, 12))):
        ident = draw(st.sampled_from(pool))
        if draw(st.integers(0, 3)) == 0:
            steps.append({"deleted": [ident]})
        else:
            steps.append({"upserted": {str(ident): draw(_labels() if ident in gen.POD_IDS
                                                      else gen._identity_labels(ident))}})
    return {"docs": docs, "steps": steps, "drop": draw(st.integers(0, 3))}


@examples(150)
@given(selector_cache_cases())
def test_selector_cache_reports_exactly_what_changed(case: dict[str, Any]) -> None:
    """The cache matches a changed identity against candidate selectors only (indexed by the
    label pairs their `In` requirements name): its selections and the changes it reports must
    be those of matching every selector."""
    note(as_json(case))
    from l7gate.policy.selectorcache import SelectorCache

    selectors: dict[str, Any] = {}
    for doc in case["docs"]:
        try:
            p = parse_policy(doc, default_namespace=gen.DEFAULT_NAMESPACE, cluster_name=gen.LOCAL_CLUSTER)
        except Exception:
            continue
        for rule in p.rules:
            selectors[rule.subject.key] = rule.subject
            for pr in rule.rules:
                for sel in pr.peers or ():
                    selectors[sel.key] = sel
    cache = SelectorCache()
    identities: dict[int, Labels] = {}
    for i, sel in enumerate(selectors.values()):
        cache.add_selector(sel)
        if i < case["drop"]:
            cache.add_selector(sel)
            cache.remove_selector(sel)  # still referenced once: stays, indexed
    dropped = list(selectors.values())[case["drop"]:case["drop"] + 1]
    for sel in dropped:
        cache.remove_selector(sel)
        del selectors[sel.key]

    def truth() -> dict[str, frozenset[int]]:
        return {k: frozenset(i for i, lab in identities.items() if s.matches(lab)) for k, s in selectors.items()}

    for step in case["steps"]:
        before = truth()
        upserted = {int(i): Labels.of(lab) for i, lab in step.get("upserted", {}).items()}
        deleted = step.get("deleted", [])
        for i in deleted:
            identities.pop(i, None)
        identities.update(upserted)
        changes = cache.update_identities(upserted, deleted)
        after = truth()
        for k in selectors:
            assert cache.selections(k) == after[k], f"selector {k}"
            ch = changes.get(k)
            assert (ch.added if ch else frozenset()) == after[k] - before[k], f"selector {k} added"
            assert (ch.removed if ch else frozenset()) == before[k] - after[k], f"selector {k} removed"
        assert set(changes) <= set(selectors)
    # A selector added once the identities exist matches the candidates its `In` pairs index
    # (identities are indexed by label pair): the same selections as matching every identity.
    late = SelectorCache()
    late.update_identities(identities)
    final = truth()
    for k, sel in selectors.items():
        late.add_selector(sel)
        assert late.selections(k) == final[k], f"selector {k} added late"
