#!/usr/bin/env bash
# The whole test suite: system packages, static checks, then every test of the workspace
# (unit, golden, nft -c in scratch network namespaces, CLI). The kernel tests need root;
# without it they print why they skip, and under CI they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

hack/install-deps.sh
hack/verify.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?

# cargo prints one result line per test binary; close with the total, so the last line
# says how many tests ran in all.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
