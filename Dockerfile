# nftproxy's image: built in a Rust image, run from a slim Debian with only the two
# shared libraries the binary links besides libc (libnftnl, libmnl).
#
#   docker build -t nftproxy:dev .
#
# The builder and runtime share a Debian release (bookworm), so the libraries the binary
# was linked against are the ones it finds at run time.

FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnftnl-dev libmnl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY crates crates
RUN cargo build --release --locked -p nftproxy \
 && strip target/release/nftproxy

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnftnl11 libmnl0 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/nftproxy /usr/local/bin/nftproxy
# Root, as kube-proxy runs; the DaemonSet (hack/deploy) grants CAP_NET_ADMIN alone, which
# covers nf_tables, ctnetlink and the forced socket buffer sizes.
USER 0:0
ENTRYPOINT ["/usr/local/bin/nftproxy"]
