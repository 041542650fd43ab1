#!/usr/bin/env bash
# The main job on the bundled example manifests (hack/examples/seed/: the redis ClusterIP,
# counter-np NodePort 31000 and counter-lb LoadBalancer from the user's notes):
#  0. says in plain words what the example Services are, and with `nftproxy explain`
#     where a new connection to each of their addresses goes;
#  1. prints the ruleset nftproxy generates for node-a (--dry-run);
#  2. as root, in a scratch network namespace (deleted afterwards; the host's ruleset is
#     never touched): programs it with `nftproxy --once` over netlink, lists what the
#     kernel holds, shows that a second run has nothing to do (--dry-run --diff), and
#     removes it again (--cleanup).
set -euo pipefail
cd "$(dirname "$0")/.."

hack/install-deps.sh
echo "building nftproxy (release)..." >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo build --release --locked -q -p nftproxy 2>"$log" || { cat "$log" >&2; exit 1; }
bin=$PWD/target/release/nftproxy
flags=(--manifests hack/examples/seed/ --node-name node-a --node-ip 192.168.50.10 --cluster-cidr 10.244.0.0/16)

cat <<'TEXT'
### The example cluster (hack/examples/seed/), seen from node-a (192.168.50.10)

Three Services, each backed by two pods: one on node-a (10.244.1.x), one on another
node (10.244.2.x). Pods live in 10.244.0.0/16.

  redis       ClusterIP     10.103.50.102:6379, reachable only inside the cluster
  counter-np  NodePort      10.101.168.165:3000, and port 31000 on every node
  counter-lb  LoadBalancer  10.109.133.129:30000, port 31535 on every node, and the
                            load balancer's address 192.168.50.200:30000

nftproxy turns this into one nftables table. Where the first packet of a new
connection goes, as `nftproxy explain` reads that table (traffic from outside the
pod network is masqueraded, so that replies come back through this node):

TEXT
explain() {
  local who=$1 from=$2 to=$3
  local result
  result=$("$bin" explain "${flags[@]}" --from "$from" --to "$to" | sed -n 's/^result: //p')
  printf '  %s, %s\n      -> %s\n' "$who" "$to" "$result"
}
explain "a pod (10.244.1.5) to redis" 10.244.1.5 10.103.50.102:6379/tcp
explain "a pod to redis, on a port it lacks" 10.244.1.5 10.103.50.102:80/tcp
explain "a client (203.0.113.9) to counter-np" 203.0.113.9 192.168.50.10:31000/tcp
explain "a client to counter-lb's LB IP" 203.0.113.9 192.168.50.200:30000/tcp
explain "a client to counter-lb's NodePort" 203.0.113.9 192.168.50.10:31535/tcp
echo
echo "(each rule on the way: nftproxy explain ${flags[*]} --from 203.0.113.9 --to 192.168.50.10:31000/tcp)"
echo

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
