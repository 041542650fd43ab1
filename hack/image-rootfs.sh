#!/usr/bin/env bash
# The runtime file system of nftproxy's image: the binary, the shared libraries it loads
# and the CA bundle, nothing else (no shell, no package manager). Both image recipes use
# it: hack/image.sh (podman, offline) and the Dockerfile (a registry-connected build).
#
#   hack/image-rootfs.sh BINARY OUT_DIR
#
# The libraries come from Debian's own packages of the release this machine runs, which
# is the release BINARY was linked on: mmdebstrap extracts them into a staging tree, and
# only the files the binary's dynamic loader resolves (ldd) are copied out of it, to the
# paths ldd names. Needs root (or fakeroot) for mmdebstrap and a Debian package mirror.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 BINARY OUT_DIR" >&2
  exit 2
fi
binary=$1
out=$2
[ -x "$binary" ] || { echo "$0: $binary is not an executable" >&2; exit 2; }
[ ! -e "$out" ] || [ -z "$(ls -A "$out")" ] || { echo "$0: $out is not empty" >&2; exit 2; }

# The packages holding what ldd lists for the binary, and the CA certificates (the API
# client trusts the ServiceAccount's CA, but a kubeconfig may name a public endpoint).
packages=libc6,libgcc-s1,libnftnl11,libmnl0,ca-certificates
release=$(. /etc/os-release && echo "$VERSION_CODENAME")
# The machine's own package sources, so that the image gets the versions it has.
sources=()
for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -s "$file" ] && grep -qv '^\s*\(#\|$\)' "$file" && sources+=("$file")
done
[ ${#sources[@]} -gt 0 ] || sources=("http://deb.debian.org/debian")

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# extract: unpack the packages (and what they depend on) without running any of their
# scripts, so it needs no chroot and works inside a container build too.
mmdebstrap --quiet --mode=chrootless --variant=extract --include="$packages" \
  "$release" "$stage" "${sources[@]}"

mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs" "$out/tmp"
chmod 1777 "$out/tmp"
install -m 0755 "$binary" "$out/usr/local/bin/nftproxy"

# Every library and the loader, at the path ldd resolves it to here, taken from the
# staging tree's multiarch directories (Debian 12 ships under both /lib and /usr/lib).
ldd "$binary" | awk '/=> \// { print $3 } /^[ \t]*\/[^ ]+ \(/ { print $1 }' | while read -r path; do
  name=$(basename "$path")
  multiarch=$(basename "$(dirname "$(readlink -f "$path")")")
  found=""
  for dir in "lib/$multiarch" "usr/lib/$multiarch"; do
    [ -e "$stage/$dir/$name" ] && found="$stage/$dir/$name"
  done
  if [ -z "$found" ]; then
    echo "$0: $name (needed by $binary) is in none of: $packages" >&2
    exit 1
  fi
  mkdir -p "$out$(dirname "$path")"
  cp -L "$found" "$out$path"
done

# What update-ca-certificates writes with Debian's default (every Mozilla CA trusted).
LC_ALL=C cat "$stage"/usr/share/ca-certificates/mozilla/*.crt > "$out/etc/ssl/certs/ca-certificates.crt"
[ -s "$out/etc/ssl/certs/ca-certificates.crt" ] || { echo "$0: no CA certificates" >&2; exit 1; }

# Root's entries, for tools that look the user up; /etc/hosts before DNS, as on the node.
echo 'root:x:0:0:root:/root:/usr/local/bin/nftproxy' > "$out/etc/passwd"
echo 'root:x:0:' > "$out/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$out/etc/nsswitch.conf"
cp /etc/os-release "$out/etc/os-release"
