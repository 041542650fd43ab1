#!/usr/bin/env bash
# Regenerates rules-golden/*/{ip,ip6}.nft and warnings.txt, then shows what changed.
# Every changed line is a behaviour change: read it before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATE_GOLDEN=1 cargo test -p nftproxy-render --test golden
git diff --stat -- rules-golden/
