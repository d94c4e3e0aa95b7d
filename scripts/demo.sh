#!/usr/bin/env bash
# The seed scenario (examples/seed: the article's policy files unchanged; its Service given a ClusterIP and a
# copy for cluster-b, examples/seed/cluster-b): validate the policies, then
# trace the article's requests from frontend-service (cluster-b) to billing-service (cluster-a).
# Exits non-zero if any verdict differs from the article's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

L7GATE=.venv/bin/l7gate
PY=.venv/bin/python
SEED=examples/seed
FRONTEND=cluster-b/web/frontend-service-abc
BILLING=cluster-a/payments/billing-service-xyz
OTHER=cluster-b/web/reporting-job-q7x

echo "== l7gate policy validate $SEED"
"$L7GATE" policy validate "$SEED"

echo
echo "== l7gate policy trace: the seed table"
printf '%-66s %-9s %-6s %s\n' "REQUEST" "VERDICT" "LAYER" "EXPECTED"
failed=0
row() {
    local expected=$1 from=$2
    shift 2
    local out verdict
    out=$("$L7GATE" policy trace -f "$SEED" --from "$from" --to "$BILLING" "$@" -o json)
    verdict=$(printf '%s' "$out" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["verdict"] + ("/" + d["layer"] if d["layer"] else ""))')
    printf '%-66s %-9s %-6s %s\n' "${from##*/} $*" "${verdict%%/*}" "$( [ "${verdict#*/}" != "$verdict" ] && echo "${verdict#*/}" || echo -)" "$expected"
    [ "$verdict" = "$expected" ] || { echo "   ^ MISMATCH: expected $expected, got $verdict"; failed=1; }
}
row allowed      "$FRONTEND" --port 8080 --method POST --path /v1/charge
row denied/l7    "$FRONTEND" --port 8080 --method GET --path /v1/transactions
row denied/l7    "$FRONTEND" --port 8080 --method POST --path /v1/refund
row denied/l3l4  "$FRONTEND" --port 9090
row denied/l3l4  "$OTHER" --port 8080 --method POST --path /v1/charge

echo
echo "== why GET /v1/transactions is denied"
"$L7GATE" policy trace -f "$SEED" --from "$FRONTEND" --to "$BILLING" --port 8080 \
    --method GET --path /v1/transactions

exit "$failed"
