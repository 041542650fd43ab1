#!/usr/bin/env bash
# Records what the kernel answers the dumps nftproxy's netlink parsers read, as the
# fuzz-style tests' seeds (crates/netlink/tests/replies/*.hex, one received buffer per
# line in hex, after a `# what` line). Everything happens in a scratch network namespace;
# the tools that ask (nft, conntrack, ip) are traced with strace, which prints each
# buffer received. Needs root, nft, conntrack, iproute2, strace and python3; CI does not
# run it: the recordings are committed.
set -euo pipefail
cd "$(dirname "$0")/.."

out=crates/netlink/tests/replies
mkdir -p "$out"
ns="nftproxy-record-$$"
trace=$(mktemp)
trap 'ip netns del "$ns" 2>/dev/null || true; rm -f "$trace"' EXIT
ip netns add "$ns"
in_ns() { ip netns exec "$ns" "$@"; }
in_ns ip link set lo up

# The buffers a traced command received on its sockets, as hex lines.
received() {
  python3 - "$trace" <<'EOF'
import re, sys
buffers, current = [], None
for line in open(sys.argv[1]):
    if re.match(r"^\s*\* \d+ bytes in buffer", line):
        current = []
        buffers.append(current)
    elif current is not None and re.match(r"^\s*\| [0-9a-f]{5}  ", line):
        # " | 00000  2c 00 ... (16 bytes in two groups)  text |"
        dump = line.split("|", 2)[1].strip().split(None, 1)[1]
        current.extend(dump[:49].split())
    else:
        current = None
for buffer in buffers:
    if buffer:
        print("".join(buffer))
EOF
}

record() {
  local what=$1
  shift
  : >"$trace"
  in_ns strace -f -e trace=recvmsg,recvfrom -e read=all -o "$trace" "$@" >/dev/null 2>&1 || true
  echo "# $what"
  received
}

# nf_tables: golden tables with every object kind nftproxy writes (verdict maps, sets
# with timeouts, dynamic sets, counters, concatenations, both families).
for case in seed session-affinity service-counters dualstack; do
  in_ns nft flush ruleset
  in_ns nft -f "rules-golden/$case/ip.nft"
  [ -f "rules-golden/$case/ip6.nft" ] && in_ns nft -f "rules-golden/$case/ip6.nft"
  record "nft list ruleset: rules-golden/$case" nft list ruleset
done >"$out/nftables.hex"

# Notifications: what a listener hears while another program commits.
in_ns nft flush ruleset
: >"$trace"
in_ns strace -f -e trace=recvmsg,recvfrom -e read=all -o "$trace" timeout 2 nft monitor >/dev/null 2>&1 &
sleep 0.5
in_ns nft -f rules-golden/seed/ip.nft
in_ns nft add table ip other
in_ns nft delete table ip other
wait || true
{ echo "# nft monitor: the seed table and another added and deleted"; received; } >"$out/notifications.hex"

# Interface addresses: links and addresses of both families.
in_ns ip link add a0 type veth peer name a1
in_ns ip addr add 192.168.50.10/24 dev a0
in_ns ip addr add fd00::10/64 dev a0
in_ns ip addr add 10.0.0.1 peer 10.0.0.2 dev a1
in_ns ip link set a0 up
in_ns ip link set a1 up
{ record "ip link show" ip link show; record "ip addr show" ip addr show; } >"$out/addresses.hex"

# Conntrack: UDP and TCP flows (datagrams to a local address and a refused connection),
# tracked while a ruleset that uses conntrack is loaded.
in_ns nft -f rules-golden/seed/ip.nft
in_ns bash -c 'for p in 53 5353 8053; do echo x > /dev/udp/192.168.50.10/$p; done 2>/dev/null; (echo x > /dev/tcp/192.168.50.10/9) 2>/dev/null; true'
record "conntrack -L" conntrack -L >"$out/conntrack.hex"

wc -l "$out"/*.hex
