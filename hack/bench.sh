#!/usr/bin/env bash
# The scale benchmark (needs root: every measurement runs in a fresh network namespace).
# Loads N Services x E endpoints with nftproxy's netlink path, with `nft -f` of the same
# ruleset and with `nft -f` of upstream kube-proxy 1.36's shape, then single changes and
# connect latency (with and without connection counters, whose cold-load cost and
# scrape read are measured too); `nftproxy --dry-run` and `--once` of a manifest file;
# then the nftproxy daemon itself against an in-process API server (cold start, restart,
# /healthz answered during both); prints a Markdown table and writes bench.json.
#   hack/bench.sh                                  # 1k, 10k, 30k x 5; 30k x 10; latency
#   hack/bench.sh --services 1000 --wide-services 0 --latency 10 --daemon-services 1000
#                                                  # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
cargo build --release --locked -q -p nftproxy-bench -p nftproxy
exec target/release/nftproxy-bench --json bench.json "$@"
