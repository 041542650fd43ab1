# nftproxy's image, for a build with access to a container registry:
#
#   docker build -t registry.example/nftproxy:0.1.0 .
#
# The binary is built in Rust's Debian image; the runtime stage starts from nothing and
# holds only the binary, the libraries it loads (libc, libgcc_s, libnftnl, libmnl) and the
# CA bundle, taken from Debian's packages of the same release by hack/image-rootfs.sh.
# hack/image.sh builds the same runtime stage offline with podman.

FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnftnl-dev libmnl-dev pkg-config mmdebstrap \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY crates crates
COPY hack/image-rootfs.sh hack/
RUN cargo build --release --locked -p nftproxy \
 && strip target/release/nftproxy \
 && hack/image-rootfs.sh target/release/nftproxy /rootfs

FROM scratch AS runtime
COPY --from=build /rootfs /
LABEL org.opencontainers.image.title="nftproxy" \
      org.opencontainers.image.description="A kube-proxy replacement that programs nf_tables over netlink"
# Root, as kube-proxy runs; the DaemonSet (hack/deploy) grants CAP_NET_ADMIN alone, which
# covers nf_tables, ctnetlink and the forced socket buffer sizes.
USER 0:0
ENTRYPOINT ["/usr/local/bin/nftproxy"]
