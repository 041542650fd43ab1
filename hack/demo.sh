#!/usr/bin/env bash
# The main job on the bundled example manifests (examples/seed/: the redis ClusterIP,
# counter-np NodePort 31000 and counter-lb LoadBalancer from the user's notes):
#  1. prints the ruleset nftproxy generates for node-a (--dry-run);
#  2. as root, loads that exact text into a scratch network namespace and lists what the
#     kernel holds. The namespace is deleted afterwards; the host's ruleset is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."

hack/install-deps.sh
cargo build --release --locked -p nftproxy
bin=target/release/nftproxy
flags=(--manifests examples/seed/ --node-name node-a --node-ip 192.168.50.10 --cluster-cidr 10.244.0.0/16)

echo "### nftproxy --dry-run ${flags[*]}"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$bin" --dry-run "${flags[@]}" | tee "$out"

if [ "$(id -u)" -ne 0 ]; then
  echo "### not root: skipping the load into a scratch network namespace" >&2
  exit 0
fi
echo
echo "### loaded into a scratch network namespace; nft list table ip nftproxy:"
unshare --net sh -c "nft -f '$out' && nft list table ip nftproxy"
