#!/usr/bin/env bash
# Installs the Debian packages nftproxy needs to build and test: libnftnl/libmnl for the
# netlink backend, nft and iproute2 for the kernel tests, conntrack for the UDP cleanup
# tests, GNU time for the benchmark's nft -f peak memory, netbase for /etc/protocols
# (without it nft lists protocols as numbers), iptables (iptables-nft, to write kube-proxy-shaped
# rules in the takeover tests). Idempotent: does nothing when everything is already there.
set -euo pipefail

packages=(nftables libnftnl-dev libmnl-dev pkg-config iproute2 conntrack util-linux procps time netbase iptables)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
