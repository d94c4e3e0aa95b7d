"""What one `Decision` says about one HTTP request: the verdict every L7 engine enforces.

Envoy gets a decision as an RBAC matcher leaf (`xds.rbac.decision_on_match`); the h11 engine
(`l7proxy.h11engine`) calls `request_verdict` on it per request. Both name the verdict with the
same action name, which the flows read back: `allow|<policies>`, `deny-l3l4|<policies>`,
`deny-l7|<policies>`, `deny-auth|<policies>`. Pure: no I/O.

The request is matched as Envoy's matcher sees it: the method, the normalized `:path` (path and
query, `pathnorm.normalize_path`), `:authority` (HTTP/1.1: the Host header) and the request
headers by lower-case name, the values of a repeated header joined with "," (Envoy's
`HttpRequestHeaderMatchInput`). Patterns are RE2 full matches (`regex.full_match`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .mapstate import Action, Decision
from .types import HTTPRequest

MAX_NAMED_POLICIES = 3


def named_policies(d: Decision) -> str:
    """The policies behind a decision, for flows; at most a few (Envoy copies the action name
    into every access log entry, and a default deny can involve every policy on the pod).

    A default deny (a DENY no rule states: no origins) names none. Its decision is world's
    and that of every peer no rule names, so its leaf sits in every source-address slot of the
    endpoint's ports: when it named the endpoint's first policies, a policy added or removed
    among them re-sent every slot (~5 MB at 1,000 policies x 10,000 identities). As in Cilium's
    flows, a default-deny drop names no policy. No count of the others either, for the same
    reason."""
    if d.action is Action.DENY and not d.origins:
        return ""
    pols = d.policies
    if len(pols) <= MAX_NAMED_POLICIES:
        return ",".join(pols)
    return ",".join(pols[:MAX_NAMED_POLICIES]) + ",+more"


@dataclass(frozen=True, slots=True)
class RequestVerdict:
    allowed: bool
    action: str  # the action name: "<kind>|<policies>"


def request_verdict(d: Decision, req: HTTPRequest, normalized_path: str, *, auth_verified: bool = False) -> RequestVerdict:
    """The verdict of decision `d` on `req` whose normalized `:path` is `normalized_path`.

    `auth_verified`: mutual authentication was checked before the request reached the proxy
    (kernel mode); without it (loopback) a decision that requires it denies: fail closed."""
    pols = named_policies(d)
    if d.action is Action.DENY:
        return RequestVerdict(False, f"deny-l3l4|{pols}")
    if d.action is Action.AUTH_FAIL or (d.auth_required and not auth_verified):
        return RequestVerdict(False, f"deny-auth|{pols}")
    if d.action is Action.ALLOW:
        return RequestVerdict(True, f"allow|{pols}")
    if any(rule.matches(req, normalized_path) for rule in d.http):
        return RequestVerdict(True, f"allow|{pols}")
    return RequestVerdict(False, f"deny-l7|{pols}")
