#!/usr/bin/env bash
# The seed scenario, offline: validate the seed policies, then trace the seed's four requests.
# Placeholder: the policy/CLI owner finalizes pod names and output once `l7gate policy` lands.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

L7GATE=.venv/bin/l7gate
SEED=examples/seed
FROM=cluster-b/web/frontend-service
TO=cluster-a/payments/billing-service

echo "== l7gate policy validate $SEED"
"$L7GATE" policy validate "$SEED"

trace() {
    echo
    echo "== trace $FROM -> $TO $*"
    "$L7GATE" policy trace -f "$SEED" --from "$FROM" --to "$TO" "$@"
}
trace --port 8080 --method POST --path /v1/charge        # expected: allowed
trace --port 8080 --method GET --path /v1/transactions   # expected: denied at L7
trace --port 8080 --method POST --path /v1/refund        # expected: denied at L7
trace --port 9090                                        # expected: denied at L3/L4
