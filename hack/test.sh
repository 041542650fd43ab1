#!/usr/bin/env bash
# The whole test suite: system packages, static checks, then every test of the workspace
# (unit, golden, nft -c in scratch network namespaces, CLI). The kernel tests need root;
# without it they skip, named and counted in the closing line, and under CI (CI set to
# anything but empty or "false") they fail instead. Every test binary runs, also after
# one of them failed.
set -euo pipefail
cd "$(dirname "$0")/.."

hack/install-deps.sh
hack/verify.sh

log=$(mktemp)
NFTPROXY_SKIPPED=$(mktemp)
export NFTPROXY_SKIPPED
trap 'rm -f "$log" "$NFTPROXY_SKIPPED"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?

# The README's other command, the main job on the example manifests, must run too.
demo=$(mktemp)
demo_status=0
if hack/demo.sh >"$demo" 2>&1 && grep -q '^table ip nftproxy' "$demo" && grep -q -- '-> dnat' "$demo"; then
  echo "demo: hack/demo.sh ran"
else
  cat "$demo"
  echo "demo: hack/demo.sh FAILED"
  demo_status=1
fi
rm -f "$demo"

# cargo prints one result line per test binary, and counts a skipped test as passed;
# close with the totals of all of them, so the last line says what ran in all.
skipped=$(wc -l < "$NFTPROXY_SKIPPED")
if [ "$skipped" -gt 0 ]; then
  echo "skipped (cannot run here):"
  sed 's/^/  /' "$NFTPROXY_SKIPPED"
fi
# A test binary that failed to build or crashed leaves no result line: say so.
if [ "$status" -ne 0 ] && ! grep -q '^test result: FAILED' "$log"; then
  echo "cargo test failed before every test ran (see above)"
fi
awk -v skipped="$skipped" \
  '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
   END { printf "tests: %d passed, %d failed, %d skipped\n", p - skipped, f, skipped }' "$log"
[ "$status" -ne 0 ] && exit "$status"
exit "$demo_status"
