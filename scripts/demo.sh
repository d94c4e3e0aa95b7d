#!/usr/bin/env bash
# The seed scenario, offline: validate the seed policies, then trace the seed's requests.
# Placeholder: the policy/CLI owner finalizes it once `l7gate policy` lands.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

L7GATE=.venv/bin/l7gate
SEED=examples/seed
FRONTEND=cluster-b/web/frontend-service-abc
BILLING=cluster-a/payments/billing-service-xyz
OTHER=cluster-b/web/reporting-job-q7x

echo "== l7gate policy validate $SEED"
"$L7GATE" policy validate "$SEED"

trace() {
    local from=$1
    shift
    echo
    echo "== trace $from -> $BILLING $*"
    # A denied verdict may exit 1; only a usage or internal error (>= 2) stops the demo.
    local rc=0
    "$L7GATE" policy trace -f "$SEED" --from "$from" --to "$BILLING" "$@" || rc=$?
    [ "$rc" -le 1 ] || exit "$rc"
}
trace "$FRONTEND" --port 8080 --method POST --path /v1/charge       # expected: allowed
trace "$FRONTEND" --port 8080 --method GET --path /v1/transactions  # expected: denied at L7
trace "$FRONTEND" --port 8080 --method POST --path /v1/refund       # expected: denied at L7
trace "$FRONTEND" --port 9090                                       # expected: denied at L3/L4
trace "$OTHER" --port 8080 --method POST --path /v1/charge          # expected: denied at L3/L4
