#!/usr/bin/env bash
# Static checks: formatting, clippy with warnings as errors, and the crate-graph rule that
# the pure crates (nft, model, render) never depend on a runtime, the API client or
# sockets.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

forbidden='^(tokio|kube|kube-client|kube-runtime|libc|nix|mnl|mnl-sys|nftnl|nftnl-sys|hyper|reqwest)$'
for crate in nftproxy-nft nftproxy-model nftproxy-render; do
  bad=$(cargo tree -q -p "$crate" -e normal --prefix none | sed 's/ v[0-9].*//' | sort -u | grep -E "$forbidden" || true)
  if [ -n "$bad" ]; then
    echo "verify: pure crate $crate depends on: $bad" >&2
    exit 1
  fi
done
echo "verify: fmt, clippy and crate graph OK"
