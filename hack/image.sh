#!/usr/bin/env bash
# Builds the image nftproxy:<version> with podman, without reaching any container
# registry: the release binary built here, on the runtime tree of hack/image-rootfs.sh
# (Debian's libc, libnftnl, libmnl and CA bundle, from this machine's package mirror),
# with the Dockerfile's own runtime stage. Prints the image's name and size.
#
#   hack/image.sh            # then: podman push nftproxy:<version> REGISTRY/nftproxy:<version>
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "$0: run as root: the image's files belong to root, and podman keeps it in root's storage" >&2
  exit 1
fi

hack/install-deps.sh
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
image="nftproxy:$version"

cargo build --release --locked -p nftproxy
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
strip -o "$work/nftproxy" target/release/nftproxy
hack/image-rootfs.sh "$work/nftproxy" "$work/rootfs"

# The Dockerfile's last stage, with the tree above where its build stage's tree goes:
# both recipes give the image the same files, user and entry point.
sed -n '/^FROM scratch AS runtime$/,$p' Dockerfile \
  | sed 's|^COPY --from=build /rootfs /$|COPY rootfs /|' > "$work/Containerfile"
if ! grep -q '^COPY rootfs /$' "$work/Containerfile"; then
  echo "$0: the Dockerfile has no 'FROM scratch AS runtime' stage copying /rootfs" >&2
  exit 1
fi
podman build --quiet --pull=never --network=none --layers=false \
  --label "org.opencontainers.image.version=$version" \
  --tag "$image" --file "$work/Containerfile" "$work" >/dev/null
# The image this tag named before, now untagged, goes (only nftproxy's).
podman image prune --force --filter "label=org.opencontainers.image.title=nftproxy" >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "image: $image, $(( (size + 500000) / 1000000 )) MB"
