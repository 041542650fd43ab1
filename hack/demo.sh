#!/usr/bin/env bash
# The main job on the bundled example manifests (hack/examples/seed/: the redis ClusterIP,
# counter-np NodePort 31000 and counter-lb LoadBalancer from the user's notes):
#  1. prints the ruleset nftproxy generates for node-a (--dry-run);
#  2. as root, in a scratch network namespace (deleted afterwards; the host's ruleset is
#     never touched): programs it with `nftproxy --once` over netlink, lists what the
#     kernel holds, shows that a second run has nothing to do (--dry-run --diff), and
#     removes it again (--cleanup).
set -euo pipefail
cd "$(dirname "$0")/.."

hack/install-deps.sh
cargo build --release --locked -p nftproxy
bin=$PWD/target/release/nftproxy
flags=(--manifests hack/examples/seed/ --node-name node-a --node-ip 192.168.50.10 --cluster-cidr 10.244.0.0/16)

echo "### nftproxy --dry-run ${flags[*]}"
"$bin" --dry-run "${flags[@]}"

if [ "$(id -u)" -ne 0 ]; then
  echo "### not root: skipping the one-shot program into a scratch network namespace" >&2
  exit 0
fi
echo
echo "### in a scratch network namespace: nftproxy --once, then nft list table ip nftproxy"
unshare --net bash -euo pipefail -c '
  "$0" --once "${@}"
  nft list table ip nftproxy
  echo "### nftproxy --dry-run --diff (the kernel already matches):"
  "$0" --dry-run --diff "${@}"
  echo "### nftproxy --cleanup"
  "$0" --cleanup
  echo "tables left: $(nft list tables | wc -l)"
' "$bin" "${flags[@]}"
