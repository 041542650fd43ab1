#!/usr/bin/env bash
# The scale benchmark (needs root: every measurement runs in a fresh network namespace).
# Loads N Services x E endpoints with nftproxy's netlink path, with `nft -f` of the same
# ruleset and with `nft -f` of upstream kube-proxy 1.36's shape, then single changes and
# connect latency (with and without connection counters, whose cold-load cost and
# scrape read are measured too); the large loads (44,000 x 6, 5,000 x 50);
# `nftproxy --dry-run` and `--once` of JSON and YAML manifest files beside the daemon's
# first sync of the same objects; the daemon itself against an in-process API server
# (cold start, restart, /healthz answered during both); network programming latency
# under EndpointSlice churn; prints Markdown tables (the last against issue 22's
# targets) and writes bench.json.
#   hack/bench.sh                                  # everything (about 15 minutes)
#   hack/bench.sh --services 1000 --wide-loads 5000x50 --latency 10 \
#       --daemon-loads 1000x5 --churn-seconds 10   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
cargo build --release --locked -q -p nftproxy-bench -p nftproxy
exec target/release/nftproxy-bench --json bench.json "$@"
