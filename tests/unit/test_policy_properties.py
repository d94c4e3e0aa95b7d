"""Property tests for the policy engine (CONVENTIONS.md 11, 12).

1. Differential: the resolved maps read by `resolve.lookup` give the verdict the reference
   evaluator gives — per direction (the other side unmanaged), and for the whole flow (egress of
   the source composed with ingress of the destination). Generated pods declare named container
   ports, and generated rules name them (`port: http`). Policies may name CiliumCIDRGroups
   (the scenario's `cidr_groups`): the resolver gets them expanded with the groups, as the agent
   does, and the reference evaluator reads the references itself. Rules may name nodes by their
   labels (`fromNodes`/`toNodes`), and the universe holds node identities (the host with this
   node's labels, other nodes' from theirs, `remote-node` for a node whose labels are unknown).
2. Incremental == full: any sequence of identity, endpoint, policy, named port and CIDR group
   changes (a group change re-expands the policies naming groups, and upserts those that
   changed, as the agent does) leaves every endpoint's maps equal to those of a resolver built
   from scratch on the final state; the
   PolicyDeltas, applied in order to the initial maps, give the final maps; a full recompute
   afterwards finds nothing to change.
3. The parser parses or raises PolicyValidationError, never anything else, on arbitrary JSON and
   on mutated valid documents; every finding names a field that is in the document.

Every failing input (found by Hypothesis, or by reading the code) is kept under
`tests/corpus/{differential,incremental,parser}/` and replayed by `test_corpus`; Hypothesis prints
a failing example as corpus JSON (the `note` in each test). Case keys: `description`; `found`
(the bug it caught, now fixed); `xfail` (a bug still open: the replay is a strict xfail, so it
fails the day the bug is fixed, and then the key and its `KNOWN_BUGS` entry must go);
differential flows may carry `expect` (the verdict Cilium gives), parser cases `expect_errors`.

`L7GATE_PROPERTY_SCALE=10` multiplies the number of examples (CI soak runs).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import event as _hypothesis_event
from hypothesis import strategies as st

from l7gate.policy.cidrgroup import CIDRGroup, parse_cidr_group
from l7gate.k8s.objects import K8sObjectError, parse_endpoint_slice, parse_service, service_targets_of
from l7gate.policy.references import expand_policy, references_groups, references_services
from l7gate.policy.toservices import ServiceTarget
from l7gate.policy.errors import Finding, PolicyValidationError
from l7gate.policy.evaluate import Flow, Verdict, evaluate
from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.mapstate import EndpointPolicy, MapEntry, MapKey, PolicyDelta, lookup
from l7gate.policy.namedports import NamedPorts
from l7gate.policy.resolve import Resolver
from l7gate.policy.types import Direction, Policy, Protocol, Rule
from tests.unit import strategies as gen

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
SCALE = int(os.environ.get("L7GATE_PROPERTY_SCALE", "1"))


def examples(n: int) -> settings:
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def event(what: str) -> None:
    """Hypothesis statistics; a no-op when a corpus case is replayed outside Hypothesis."""
    if currently_in_test_context():
        _hypothesis_event(what)


def as_json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, ensure_ascii=True)


# -- shared: documents → policies ---------------------------------------------------------------


def parse_all(
    docs: Iterable[Any], *, default_namespace: str, cluster_name: str
) -> dict[str, Policy]:
    """Parse documents in order, later ones replacing earlier ones with the same key; rejected
    documents are dropped (and counted as a Hypothesis event)."""
    out: dict[str, Policy] = {}
    for doc in docs:
        try:
            p = parse_policy(doc, default_namespace=default_namespace, cluster_name=cluster_name)
        except PolicyValidationError:
            event("document rejected")
            continue
        event("document parsed")
        out[p.key] = p
    return out


def rules_of(policies: Mapping[str, Policy]) -> list[Rule]:
    return [r for k in sorted(policies) for r in policies[k].rules]


def parse_groups(docs: Iterable[Any]) -> dict[str, CIDRGroup]:
    """CiliumCIDRGroups by name, later ones replacing earlier ones; rejected ones dropped."""
    out: dict[str, CIDRGroup] = {}
    for doc in docs:
        try:
            g = parse_cidr_group(doc)
        except PolicyValidationError:
            event("group rejected")
            continue
        out[g.name] = g
    return out


def parse_services(docs: Iterable[Any], cluster_name: str = gen.LOCAL_CLUSTER) -> dict[str, ServiceTarget]:
    """What toServices reads of Service and EndpointSlice documents (later ones replacing earlier
    ones of the same namespace/name; rejected ones dropped), as the agent builds it."""
    services: dict[str, Any] = {}
    slices: dict[str, Any] = {}
    for doc in docs:
        try:
            if doc.get("kind") == "Service":
                svc = parse_service(doc, default_cluster=cluster_name)
                services[svc.ref] = svc
            else:
                es = parse_endpoint_slice(doc, default_cluster=cluster_name)
                slices[es.ref] = es
        except K8sObjectError:
            event("service or slice rejected")
    return service_targets_of(services.values(), slices.values()).get(cluster_name, {})


def build_resolver(
    identities: Mapping[int, Labels],
    endpoints: Iterable[int],
    policies: Mapping[str, Policy],
    *,
    policies_first: bool = True,
    named_ports: Mapping[int, NamedPorts] | None = None,
    resolver_class: type[Resolver] = Resolver,
    groups: Mapping[str, CIDRGroup] | None = None,
    services: Mapping[str, ServiceTarget] | None = None,
) -> Resolver:
    """A resolver built from scratch; policies naming CIDR groups or Services go in expanded
    with `groups` and `services`."""
    r = resolver_class()
    r.update_identities(dict(identities))
    expanded = {k: expand_policy(p, groups or {}, services or {}) for k, p in policies.items()}
    if named_ports and policies_first:
        r.update_named_ports(named_ports)
    if policies_first:
        for k in sorted(expanded):
            r.upsert_policy(expanded[k])
    for e in sorted(endpoints):
        r.add_endpoint(e)
    if not policies_first:
        for k in sorted(expanded, reverse=True):
            r.upsert_policy(expanded[k])
        if named_ports:
            r.update_named_ports(named_ports)
    return r


# -- known bugs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownBug:
    """A bug with a strict-xfail corpus case. While it is open, the property tests let inputs that
    hit it pass (as a Hypothesis event), so that they keep looking for other bugs. When it is
    fixed, its corpus case XPASSes and fails: drop the case's "xfail" key and this entry."""

    corpus: str
    exc_type: type[BaseException]
    message: str  # regex searched in str(exception)
    raised_in: str = ""  # a function of l7gate.policy the exception must come through

    def matches(self, exc: BaseException) -> bool:
        if not isinstance(exc, self.exc_type) or not re.search(self.message, str(exc)):
            return False
        if not self.raised_in:
            return True
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == self.raised_in and "l7gate/policy" in code.co_filename:
                return True
            tb = tb.tb_next
        return False


# Open bugs, each with its corpus case.
KNOWN_BUGS: tuple[KnownBug, ...] = ()


def tolerating_known_bugs(check: Any, *args: Any) -> None:
    try:
        check(*args)
    except Exception as exc:
        bug = next((b for b in KNOWN_BUGS if b.matches(exc)), None)
        if bug is None:
            raise
        event(f"known bug {bug.corpus}")


# -- 1. differential: resolved maps vs the reference evaluator -----------------------------------


def same_verdict(ref: Verdict, fast: Verdict) -> bool:
    if (ref.allowed, ref.layer) != (fast.allowed, fast.layer):
        return False
    if ref.allowed:
        return (ref.redirected, ref.auth_required) == (fast.redirected, fast.auth_required)
    return True


def _show(v: Verdict) -> str:
    layer = v.layer.value if v.layer else None
    extra = f" redirected={v.redirected} auth_required={v.auth_required}" if v.allowed else ""
    return f"{v.verdict} layer={layer}{extra}\n    " + "\n    ".join(v.reasons)


def check_differential(scn: Mapping[str, Any], lookup: Callable[..., Verdict] = lookup,
                       resolver_class: type[Resolver] = Resolver) -> None:
    """Per flow: each managed side's `lookup` equals `evaluate` with only that side managed, and
    egress-then-ingress lookups equal `evaluate` on the whole flow. A flow's optional `expect`
    (`{"allowed": bool, "layer": str | null}`) pins the reference verdict itself."""
    identities = gen.identities_of(scn)
    named = gen.named_ports_of(scn)
    endpoints = set(scn["endpoints"])
    policies = parse_all(
        scn["policies"],
        default_namespace=scn.get("default_namespace", gen.DEFAULT_NAMESPACE),
        cluster_name=scn.get("cluster_name", gen.LOCAL_CLUSTER),
    )
    rules = rules_of(policies)
    groups = parse_groups(scn.get("cidr_groups", ()))
    services = parse_services(scn.get("services", ()), scn.get("cluster_name", gen.LOCAL_CLUSTER))
    if any(references_groups(p) for p in policies.values()):
        event("a policy names CIDR groups")
    if any(references_services(p) for p in policies.values()):
        event("a policy names Services")
    resolver = build_resolver(identities, endpoints, policies, named_ports=named, resolver_class=resolver_class,
                              groups=groups, services=services)

    def flow(f: Mapping[str, Any], *, source_managed: bool, destination_managed: bool) -> Flow:
        return gen.flow_of(f, identities, source_managed=source_managed,
                           destination_managed=destination_managed, named_ports=named)

    def fast(direction: Direction, endpoint: int, peer: int, f: Mapping[str, Any]) -> Verdict:
        return lookup(
            resolver.endpoint_policy(endpoint), direction, peer, f["port"],
            Protocol(f["protocol"]), gen.request_of(f.get("http")), f.get("authenticated", False),
            f.get("tls_sni"),
        )

    for i, f in enumerate(scn["flows"]):
        src, dst = f["src"], f["dst"]
        checks: list[tuple[str, Verdict, Verdict]] = []
        if src in endpoints:
            ref = evaluate(rules, flow(f, source_managed=True, destination_managed=False), groups, services)
            checks.append(("egress of the source", ref, fast(Direction.EGRESS, src, dst, f)))
        if dst in endpoints:
            ref = evaluate(rules, flow(f, source_managed=False, destination_managed=True), groups, services)
            checks.append(("ingress of the destination", ref, fast(Direction.INGRESS, dst, src, f)))
        ref = evaluate(rules, flow(f, source_managed=src in endpoints, destination_managed=dst in endpoints), groups,
                       services)
        composed = Verdict(True, None)
        sides = []
        if src in endpoints:
            sides.append(fast(Direction.EGRESS, src, dst, f))
        if dst in endpoints and (not sides or sides[0].allowed):
            sides.append(fast(Direction.INGRESS, dst, src, f))
        denied = next((s for s in sides if not s.allowed), None)
        if denied is not None:
            composed = denied
        elif sides:
            composed = Verdict(True, None, (), (), any(s.redirected for s in sides),
                               any(s.auth_required for s in sides))
        checks.append(("whole flow", ref, composed))
        if any("port name" in r and "selects nothing" not in r for r in ref.reasons):
            event("a named port resolved")
        for what, r, q in checks:
            event(f"{what}: {f['protocol'] if f['protocol'] == 'ICMP' else ''} {r.verdict}"
                  + (f" at {r.layer.value}" if r.layer else "")
                  + (" via proxy" if r.redirected else "") + (" with auth" if r.auth_required else ""))
            assert same_verdict(r, q), (
                f"flow[{i}] {as_json(f)}\n{what}:\n  evaluate: {_show(r)}\n  lookup:   {_show(q)}"
            )
        expect = f.get("expect")
        if expect is not None:
            got = {"allowed": ref.allowed, "layer": ref.layer.value if ref.layer else None}
            assert got == expect, f"flow[{i}] {as_json(f)}: evaluate says {_show(ref)}"


@examples(150)
@given(gen.scenarios())
def test_resolved_maps_agree_with_reference_evaluator(scn: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/differential/):\n" + as_json(scn))
    check_differential(scn)


@examples(150)
@given(gen.group_scenarios())
def test_cidr_group_references_agree_with_reference_evaluator(scn: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/differential/):\n" + as_json(scn))
    check_differential(scn)


@examples(150)
@given(gen.service_scenarios())
def test_toservices_references_agree_with_reference_evaluator(scn: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/differential/):\n" + as_json(scn))
    check_differential(scn)


@examples(150)
@given(gen.node_scenarios())
def test_node_selectors_agree_with_reference_evaluator(scn: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/differential/):\n" + as_json(scn))
    check_differential(scn)


# -- 2. incremental == full ------------------------------------------------------------------------

Maps = dict[int, dict[Direction, dict[MapKey, MapEntry]]]


@dataclass
class Model:
    """What the resolver should have been told, kept independently of it."""

    identities: dict[int, Labels] = field(default_factory=dict)
    endpoints: set[int] = field(default_factory=set)
    policies: dict[str, Policy] = field(default_factory=dict)  # as parsed (groups not expanded)
    named_ports: dict[int, NamedPorts] = field(default_factory=dict)
    groups: dict[str, CIDRGroup] = field(default_factory=dict)
    service_docs: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # (kind, ns, name) → doc

    @property
    def services(self) -> dict[str, ServiceTarget]:
        return parse_services(self.service_docs.values())


def apply_op(
    r: Resolver, model: Model, op: Mapping[str, Any], *, default_namespace: str, cluster_name: str
) -> PolicyDelta | None:
    kind = op["op"]
    if kind == "identities":
        upserted = {int(i): Labels.of(lab) for i, lab in op["upserted"].items()}
        deleted = [int(i) for i in op["deleted"]]
        for i in deleted:
            model.identities.pop(i, None)
            model.endpoints.discard(i)
        model.identities.update(upserted)
        return r.update_identities(upserted, deleted)
    if kind == "add_endpoint":
        ident = op["id"]
        if ident not in model.identities:
            with pytest.raises(KeyError):
                r.add_endpoint(ident)
            return None
        model.endpoints.add(ident)
        return r.add_endpoint(ident)
    if kind == "remove_endpoint":
        model.endpoints.discard(op["id"])
        return r.remove_endpoint(op["id"])
    if kind == "upsert_policy":
        try:
            p = parse_policy(op["doc"], default_namespace=default_namespace, cluster_name=cluster_name)
        except PolicyValidationError:
            event("document rejected")
            return None
        model.policies[p.key] = p
        return r.upsert_policy(expand_policy(p, model.groups, model.services))
    if kind == "upsert_policies":
        # One change for several documents: the resolver ends where upserting them one by one,
        # in order, would (a key given twice: the later one).
        batch = []
        for doc in op["docs"]:
            try:
                p = parse_policy(doc, default_namespace=default_namespace, cluster_name=cluster_name)
            except PolicyValidationError:
                event("document rejected")
                continue
            model.policies[p.key] = p
            batch.append(expand_policy(p, model.groups, model.services))
        return r.upsert_policies(batch)
    if kind == "delete_policy":
        model.policies.pop(op["key"], None)
        return r.delete_policy(op["key"])
    if kind == "recompute_all":
        return r.recompute_all()
    if kind == "named_ports":
        changes = gen.named_ports_of(op)
        for i, ports in changes.items():
            if ports:
                model.named_ports[i] = ports
            else:
                model.named_ports.pop(i, None)
        return r.update_named_ports(changes)
    if kind in ("upsert_group", "delete_group"):
        if kind == "delete_group":
            model.groups.pop(op["name"], None)
        else:
            try:
                g = parse_cidr_group(op["doc"])
            except PolicyValidationError:
                event("group rejected")
                return None
            model.groups[g.name] = g
        changed = [e for p in model.policies.values() if references_groups(p)
                   and (e := expand_policy(p, model.groups, model.services)) != r.repository.get(p.key)]
        event(f"a group change re-expands {min(len(changed), 2)} policies")
        return r.upsert_policies(changed)
    if kind in ("upsert_services", "delete_service"):
        # A Service or its EndpointSlices changed: the policies naming Services are expanded
        # again, and those whose expansion changed upserted in one change, as the agent does.
        if kind == "delete_service":
            model.service_docs.pop((op["kind"], op["namespace"], op["name"]), None)
        for doc in op.get("docs", ()):
            meta = doc.get("metadata") or {}
            model.service_docs[(doc["kind"], meta.get("namespace", "default"), meta.get("name", ""))] = doc
        services = model.services
        changed = [e for p in model.policies.values() if references_services(p)
                   and (e := expand_policy(p, model.groups, services)) != r.repository.get(p.key)]
        event(f"a Service change re-expands {min(len(changed), 2)} policies")
        return r.upsert_policies(changed)
    raise ValueError(f"unknown op {kind!r}")


def snapshot(r: Resolver) -> dict[int, tuple[bool, bool, tuple[str, ...], dict[MapKey, MapEntry], dict[MapKey, MapEntry]]]:
    out = {}
    for e in r.endpoints():
        p = r.endpoint_policy(e)
        assert p is not None
        out[e] = (p.default_deny_ingress, p.default_deny_egress, p.policies, dict(p.ingress), dict(p.egress))
    return out


def maps_of(r: Resolver) -> Maps:
    out: Maps = {}
    for e in r.endpoints():
        p = r.endpoint_policy(e)
        assert p is not None
        out[e] = {Direction.INGRESS: dict(p.ingress), Direction.EGRESS: dict(p.egress)}
    return out


def apply_delta(maps: Maps, delta: PolicyDelta) -> None:
    """What a BPF or xDS applier does with a delta: remove endpoints, then patch entries."""
    for ident in delta.removed_endpoints:
        assert ident not in delta.changes, f"endpoint {ident} both removed and changed in one delta"
        maps.pop(ident, None)
    for ident, per in delta.changes.items():
        m = maps.setdefault(ident, {Direction.INGRESS: {}, Direction.EGRESS: {}})
        for d, dd in per.items():
            both = set(dd.upserted) & dd.deleted
            assert not both, f"endpoint {ident} {d.value}: keys both upserted and deleted: {both}"
            for k in dd.deleted:
                assert k in m[d], f"endpoint {ident} {d.value}: delta deletes {k}, which the applier never got"
                del m[d][k]
            m[d].update(dd.upserted)


def _diff(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> str:
    lines = []
    for k in sorted(set(a) | set(b), key=str):
        if a.get(k) != b.get(k):
            lines.append(f"  {k}:\n    incremental: {a.get(k)}\n    expected:    {b.get(k)}")
    return "\n".join(lines)


def check_incremental(case: Mapping[str, Any], resolver_class: type[Resolver] = Resolver) -> None:
    ns = case.get("default_namespace", gen.DEFAULT_NAMESPACE)
    cluster = case.get("cluster_name", gen.LOCAL_CLUSTER)
    r = resolver_class()
    model = Model()
    for op in case["setup"]:
        apply_op(r, model, op, default_namespace=ns, cluster_name=cluster)
    applied = maps_of(r)
    for i, op in enumerate(case["ops"]):
        delta = apply_op(r, model, op, default_namespace=ns, cluster_name=cluster)
        if delta is not None:
            apply_delta(applied, delta)
        event(f"op {op['op']}")

    assert r.endpoints() == sorted(model.endpoints)
    final = snapshot(r)
    for policies_first in (True, False):
        fresh = snapshot(build_resolver(model.identities, model.endpoints, model.policies, services=model.services,
                                        policies_first=policies_first, named_ports=model.named_ports,
                                        groups=model.groups))
        assert final == fresh, "incremental maps differ from a fresh resolver:\n" + "\n".join(
            f"endpoint {e}:\n{_diff(dict(enumerate(final.get(e, ()))), dict(enumerate(fresh.get(e, ()))))}"
            for e in sorted(set(final) | set(fresh)) if final.get(e) != fresh.get(e)
        )
    final_maps = maps_of(r)
    assert applied == final_maps, "deltas applied to the initial maps differ from the final maps:\n" + "\n".join(
        f"endpoint {e} {d.value}:\n{_diff(applied.get(e, {}).get(d, {}), final_maps.get(e, {}).get(d, {}))}"
        for e in sorted(set(applied) | set(final_maps)) for d in Direction
        if applied.get(e, {}).get(d) != final_maps.get(e, {}).get(d)
    )
    resync = r.recompute_all()
    assert resync.empty, f"a full recompute after the changes still changed: {resync.changes}"


@examples(100)
@given(gen.op_sequences())
def test_incremental_resolution_equals_full_and_deltas_replay(case: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/incremental/):\n" + as_json(case))
    check_incremental(case)


@examples(100)
@given(gen.service_op_sequences())
def test_incremental_resolution_follows_service_and_slice_changes(case: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/incremental/):\n" + as_json(case))
    check_incremental(case)


# -- 3. parser robustness -------------------------------------------------------------------------

_INDEX = re.compile(r"\[(\d+)\]")
# Findings that point at a field the document lacks (the finding is that it is missing).
MISSING_FIELD_CODES = {"required", "l7-port", "values", "api-version", "kind"}


def path_status(doc: Any, path: str) -> str:
    """"exists" when `path` (a.b[0].c) leads to a value in `doc`, "parent" when all but its last
    step do, else "missing". Keys may contain dots (label keys do), so this backtracks."""

    def walk(node: Any, rest: str, top: bool) -> str:
        if rest == "":
            return "exists"
        if isinstance(node, list):
            m = _INDEX.match(rest)
            if m is None:
                return "missing"
            i = int(m.group(1))
            if i >= len(node):
                return "parent" if m.end() == len(rest) else "missing"
            return walk(node[i], rest[m.end():], False)
        if not top:
            if not rest.startswith("."):
                return "missing"
            rest = rest[1:]
        if not isinstance(node, Mapping):
            return "missing"
        best = "missing"
        for k in node:
            if not isinstance(k, str) or not rest.startswith(k):
                continue
            tail = rest[len(k):]
            if tail and tail[0] not in ".[":
                continue
            got = walk(node[k], tail, False)
            if got == "exists":
                return got
            if got == "parent":
                best = got
        if best == "missing" and "." not in rest and "[" not in rest:
            return "parent"
        return best

    return walk(doc, path, True)


def check_finding(doc: Any, f: Finding, what: str) -> None:
    assert f.message.strip(), f"{what} without a message: {f!r}"
    status = path_status(doc, f.path)
    allowed = {"exists", "parent"} if f.code in MISSING_FIELD_CODES else {"exists"}
    assert status in allowed, f"{what} path {f.path!r} ({f.code}) is {status} in the document: {f}"


def check_parser(doc: Any, *, expect_errors: Iterable[str] = (),
                 default_namespace: str = gen.DEFAULT_NAMESPACE,
                 cluster_name: str = gen.LOCAL_CLUSTER) -> None:
    """Parses or raises PolicyValidationError; findings point into the document; the input is
    left alone. `expect_errors`: paths that must be among the errors (the document is invalid)."""
    before = copy.deepcopy(doc)
    errors: tuple[Finding, ...] = ()
    try:
        p = parse_policy(doc, default_namespace=default_namespace, cluster_name=cluster_name)
    except PolicyValidationError as exc:
        event("rejected")
        errors = exc.errors
        assert errors, "PolicyValidationError without findings"
        for f in errors:
            check_finding(doc, f, "error")
    else:
        event("parsed")
        assert isinstance(p, Policy)
        for f in p.warnings:
            check_finding(doc, f, "warning")
    assert doc == before, "the parser modified its input"
    missing = set(expect_errors) - {f.path for f in errors}
    assert not missing, f"expected errors at {sorted(missing)}, got {[str(f) for f in errors]}"


@examples(300)
@given(gen.json_values())
def test_parser_on_arbitrary_json(doc: Any) -> None:
    note("corpus JSON (tests/corpus/parser/):\n" + as_json({"doc": doc}))
    tolerating_known_bugs(check_parser, doc)


@examples(200)
@given(st.fixed_dictionaries(
    {"apiVersion": st.just("cilium.io/v2"), "kind": st.sampled_from((gen.CNP, gen.CCNP)),
     "metadata": st.just({"name": "junk"}), "spec": gen.json_values()}))
def test_parser_on_arbitrary_spec(doc: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/parser/):\n" + as_json({"doc": doc}))
    tolerating_known_bugs(check_parser, doc)


@examples(300)
@given(gen.mutated_docs())
def test_parser_on_mutated_documents(doc: dict[str, Any]) -> None:
    note("corpus JSON (tests/corpus/parser/):\n" + as_json({"doc": doc}))
    tolerating_known_bugs(check_parser, doc)


@examples(200)
@given(gen.policy_docs())
def test_parser_on_generated_documents(doc: dict[str, Any]) -> None:
    tolerating_known_bugs(check_parser, doc)


def test_generated_documents_mostly_parse() -> None:
    """The generators must exercise the resolver, not only the parser's error paths."""
    seen = {"parsed": 0, "rejected": 0}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(gen.policy_docs())
    def draw(doc: dict[str, Any]) -> None:
        try:
            parse_policy(doc, default_namespace=gen.DEFAULT_NAMESPACE, cluster_name=gen.LOCAL_CLUSTER)
        except PolicyValidationError:
            seen["rejected"] += 1
        else:
            seen["parsed"] += 1

    draw()
    total = seen["parsed"] + seen["rejected"]
    assert seen["parsed"] >= 0.5 * total, seen
    assert seen["rejected"] >= 0.05 * total, seen


# -- corpus replay ------------------------------------------------------------------------------

CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "differential": check_differential,
    "incremental": check_incremental,
    "parser": lambda case: check_parser(case["doc"], expect_errors=case.get("expect_errors", ())),
}


def corpus_cases() -> list[Any]:
    cases = []
    for kind in sorted(CHECKS):
        for path in sorted((CORPUS / kind).glob("*.json")):
            case = json.loads(path.read_text())
            marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if "xfail" in case else []
            cases.append(pytest.param(kind, case, id=f"{kind}/{path.stem}", marks=marks))
    return cases


@pytest.mark.parametrize(("kind", "case"), corpus_cases())
def test_corpus(kind: str, case: dict[str, Any]) -> None:
    CHECKS[kind](case)


def test_corpus_is_not_empty() -> None:
    for kind in CHECKS:
        assert list((CORPUS / kind).glob("*.json")), f"no corpus cases under {CORPUS / kind}"


# -- the checks can fail ----------------------------------------------------------------------------


def load_corpus(name: str) -> dict[str, Any]:
    case: dict[str, Any] = json.loads((CORPUS / f"{name}.json").read_text())
    return case


def test_differential_check_catches_a_lookup_that_ignores_http() -> None:
    def l4_only_lookup(policy: EndpointPolicy | None, direction: Direction, peer: int, port: int,
                       protocol: Protocol, request: Any = None, authenticated: bool = False,
                       tls_sni: str | None = None) -> Verdict:
        return lookup(policy, direction, peer, port, protocol, None, authenticated)

    scn = load_corpus("differential/seed-frontend-to-billing")
    check_differential(scn)
    with pytest.raises(AssertionError, match="evaluate: denied layer=l7"):
        check_differential(scn, l4_only_lookup)


def test_differential_check_catches_a_lookup_that_ignores_server_names() -> None:
    def sni_blind_lookup(policy: EndpointPolicy | None, direction: Direction, peer: int, port: int,
                         protocol: Protocol, request: Any = None, authenticated: bool = False,
                         tls_sni: str | None = None) -> Verdict:
        return lookup(policy, direction, peer, port, protocol, request, authenticated)

    scn = load_corpus("differential/server-names-egress")
    check_differential(scn)
    with pytest.raises(AssertionError, match="evaluate: denied layer=l7"):
        check_differential(scn, sni_blind_lookup)


def test_differential_check_catches_an_expansion_that_drops_except_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from l7gate.policy import cidrgroup

    real = cidrgroup.group_selectors
    scn = load_corpus("differential/cidr-groups-except-missing-and-deny")
    check_differential(scn)
    monkeypatch.setattr(cidrgroup, "group_selectors",
                        lambda peer, groups: real(dataclasses.replace(peer, excepts=()), groups))
    with pytest.raises(AssertionError, match="evaluate: denied layer=l3l4"):
        check_differential(scn)


def test_differential_check_catches_an_expansion_that_selects_services_with_a_selector(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from l7gate.k8s import objects
    from l7gate.policy import toservices

    scn = load_corpus("differential/toservices-selector-missing-not-ready-and-deny")
    check_differential(scn)
    # the Service with a selector keeps its slice's addresses, and the expansion takes them
    monkeypatch.setattr(objects, "service_target", lambda svc, addresses: ServiceTarget.of(
        svc.namespace, svc.name, svc.labels, has_selector=svc.selector is not None, addresses=addresses))
    monkeypatch.setattr(toservices, "selected_services", toservices.named_services)
    with pytest.raises(AssertionError, match="evaluate: denied layer=l3l4"):
        check_differential(scn)


def test_incremental_check_catches_lost_identity_deletions() -> None:
    class ForgetsDeletions(Resolver):
        def update_identities(self, upserted: Mapping[int, Labels], deleted: Iterable[int] = ()) -> PolicyDelta:
            return super().update_identities(upserted, ())

    case = load_corpus("incremental/namespace-move-with-deny-then-delete")
    check_incremental(case)
    with pytest.raises(AssertionError, match="differ from a fresh resolver"):
        check_incremental(case, ForgetsDeletions)


class IgnoresNamedPorts(Resolver):
    """Knows the named ports but never re-expands what depends on them."""

    def update_named_ports(self, changes: Mapping[int, NamedPorts]) -> PolicyDelta:
        self.named_ports.update({i: p for i, p in changes.items() if p})
        return PolicyDelta(self.revision)


def test_differential_check_catches_unresolved_named_ports() -> None:
    scn = load_corpus("differential/named-ports-ingress-egress-conflict")
    check_differential(scn)
    with pytest.raises(AssertionError, match="evaluate: allowed"):
        check_differential(scn, resolver_class=IgnoresNamedPorts)


def test_incremental_check_catches_named_ports_that_do_not_follow_the_pods() -> None:
    case = load_corpus("incremental/named-ports-follow-the-pods")
    check_incremental(case)
    with pytest.raises(AssertionError, match="differ from a fresh resolver"):
        check_incremental(case, IgnoresNamedPorts)


def test_incremental_check_catches_lost_deltas() -> None:
    class SilentRelabel(Resolver):
        def update_identities(self, upserted: Mapping[int, Labels], deleted: Iterable[int] = ()) -> PolicyDelta:
            super().update_identities(upserted, deleted)
            return PolicyDelta(self.revision)

    case = load_corpus("incremental/relabel-endpoint-loses-upsert")
    with pytest.raises(AssertionError, match="deltas applied to the initial maps differ"):
        check_incremental(case, SilentRelabel)


# -- found by reading, not by generation (kept as a regression) ---------------------------------


def test_entity_all_is_one_wildcard_entry() -> None:
    """Cilium resolves the `all` entity to the wildcard selector: one map entry, and a peer
    identity this node has not learnt yet (a pod just created in a remote cluster) is allowed.
    Expanded per identity, the map grows with every identity and a new peer is dropped until
    the resolver hears of it."""
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "from-anywhere", "namespace": "payments"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "billing"}},
                    "ingress": [{"fromEntities": ["all"],
                                 "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}
    identities = {
        gen.WORLD_ID: Labels.of(gen.RESERVED_IDENTITIES[gen.WORLD_ID]),
        1001: Labels.of({**gen.pod_labels_example(), "app": "billing"}),
        1002: Labels.of(gen.pod_labels_example()),
    }
    policy = parse_policy(doc, cluster_name=gen.LOCAL_CLUSTER)
    r = build_resolver(identities, [1001], {policy.key: policy})
    ep = r.endpoint_policy(1001)
    assert ep is not None
    not_yet_known = 1003
    assert lookup(ep, Direction.INGRESS, not_yet_known, 8080, Protocol.TCP).allowed
    assert len(ep.ingress) == 1
