#!/usr/bin/env bash
# Static checks: formatting and clippy with warnings as errors. The house rules no
# compiler checks (the pure crates nft, model and render never depend on a runtime, the
# API client or sockets; no pointer outside the repository; complete golden cases) are
# the `tidy` test, part of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "verify: fmt and clippy OK"
