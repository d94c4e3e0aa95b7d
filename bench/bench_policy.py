"""Policy resolution: full computation vs incremental updates, time and peak memory.

The universe: N identities cluster-wide (pods with app/team/env/namespace labels, all distinct),
E = 100 of them local endpoints on this node (a node's usual pod count), and P policies. Policy j
selects `app=app<j % 100>` and allows ingress from `team=team<j % 100>` on 8080 with HTTP rules;
every 10th also allows egress to the world on 443, every 20th denies ingress from
`env=staging` on 22. At N = 10,000 each peer selector selects 100 identities.

Measured:
- full: a fresh resolver — parse nothing (policies are parsed once), register selectors,
  compute every endpoint's template and map;
- one pod added: a new remote identity (selected by one team selector) → update_identities,
  and a new local endpoint → update_identities + add_endpoint;
- one policy replaced: policy 1 with its HTTP path alternating (upsert_policy of the same name),
  and one policy added then deleted (upsert_policy + delete_policy of a new name selecting
  app1): the endpoints it selects change by that policy's rules only;
- peak memory of the full computation (tracemalloc).
The goal (issue 2): one pod added is at least 100× cheaper than a full recompute. A policy
change is reported against the same baseline with no goal of its own: it costs in proportion to
the rules selecting the endpoints it touches (~1-5 ms here), and the full recompute it is
compared with became ~10× faster once the selector cache indexed identities by label pair.
"""

from __future__ import annotations

import itertools
from typing import Any

from run import Context, Result

from l7gate.policy.labels import Labels
from l7gate.policy.parse import parse_policy
from l7gate.policy.resolve import Resolver
from l7gate.policy.types import Policy

GROUPS = 100
ENDPOINTS = 100


def identity_labels(i: int) -> Labels:
    return Labels.of(
        {
            "app": f"app{i % GROUPS}",
            "team": f"team{(i // GROUPS) % GROUPS}",
            "env": "staging" if i % 7 == 0 else "prod",
            "version": f"v{i}",
            "io.kubernetes.pod.namespace": f"ns{i % 10}",
            "io.cilium.k8s.policy.cluster": "default",
        }
    )


def policy_doc(j: int, variant: int = 0, name: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "endpointSelector": {"matchLabels": {"app": f"app{j % GROUPS}"}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"team": f"team{j % GROUPS}"}}],
                "toPorts": [
                    {
                        "ports": [{"port": "8080", "protocol": "TCP"}],
                        "rules": {
                            "http": [
                                {"method": "POST", "path": f"/v1/charge/{j}" + "/v2" * variant},
                                {"method": "GET", "path": "/v1/items/[0-9]+"},
                            ]
                        },
                    }
                ],
            }
        ],
    }
    if j % 10 == 0:
        spec["egress"] = [{"toEntities": ["world"], "toPorts": [{"ports": [{"port": "443"}]}]}]
    if j % 20 == 0:
        spec["ingressDeny"] = [
            {
                "fromEndpoints": [{"matchLabels": {"env": "staging"}}],
                "toPorts": [{"ports": [{"port": "22"}]}],
            }
        ]
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name or f"p{j}"},
        "spec": spec,
    }


def build(policies: list[Policy], identities: dict[int, Labels]) -> Resolver:
    r = Resolver()
    r.update_identities(identities)
    for p in policies:
        r.upsert_policy(p)
    for ident in itertools.islice(identities, ENDPOINTS):
        r.add_endpoint(ident)
    return r


def run(ctx: Context) -> list[Result]:
    sizes = [(10, 100), (100, 1000)] if ctx.quick else [
        (100, 1_000), (100, 10_000), (1_000, 1_000), (1_000, 10_000)
    ]
    results: list[Result] = []
    for n_pol, n_id in sizes:
        ctx.log(f"{n_pol} policies x {n_id} identities")
        policies = [parse_policy(policy_doc(j)) for j in range(n_pol)]
        identities = {1000 + i: identity_labels(i) for i in range(n_id)}
        full = ctx.measure(lambda: build(policies, identities), runs=3)
        resolver, peak = ctx.peak_memory(lambda: build(policies, identities))
        entries = resolver.map_size()
        results.append(
            Result(
                name=f"full resolution, {n_pol} policies x {n_id} identities",
                value=full.median,
                unit="s",
                notes=f"{full.spread()}; {ENDPOINTS} endpoints, {entries} map entries",
            )
        )
        results.append(
            Result(
                name=f"peak memory, {n_pol} policies x {n_id} identities",
                value=peak / 2**20,
                unit="MiB",
                notes="tracemalloc peak of the full resolution",
            )
        )

        counter = itertools.count(10_000_000)

        def add_remote_pod() -> None:
            i = next(counter)
            resolver.update_identities({i: identity_labels(i)})

        def add_local_pod() -> None:
            i = next(counter)
            resolver.update_identities({i: identity_labels(i)})
            resolver.add_endpoint(i)

        for label, fn in (("remote pod (new identity)", add_remote_pod), ("local pod (new endpoint)", add_local_pod)):
            one = ctx.median(fn, runs=21)
            results.append(
                Result(
                    name=f"one {label} added, {n_pol} policies x {n_id} identities",
                    value=one,
                    unit="s",
                    baseline_name="full resolution",
                    baseline_value=full.median,
                    goal="incremental update >= 100x cheaper than a full recompute",
                    goal_met=full.median / one >= 100,
                )
            )

        variants = itertools.cycle([parse_policy(policy_doc(1, v)) for v in (1, 0)])
        extra = parse_policy(policy_doc(1, name="extra"))

        def replace_policy() -> None:
            resolver.upsert_policy(next(variants))

        def add_delete_policy() -> None:
            resolver.upsert_policy(extra)
            resolver.delete_policy(extra.key)

        for label, fn in (("policy replaced", replace_policy), ("policy added and deleted", add_delete_policy)):
            one = ctx.median(fn, runs=21)
            results.append(
                Result(
                    name=f"one {label}, {n_pol} policies x {n_id} identities",
                    value=one,
                    unit="s",
                    baseline_name="full resolution",
                    baseline_value=full.median,
                    notes="no goal: the issue's 100x is for one pod added; see the module docstring",
                )
            )
    return results
