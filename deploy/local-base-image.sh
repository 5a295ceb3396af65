#!/usr/bin/env bash
# For machines that cannot pull from Docker Hub (no registry reachable) but can reach Debian's
# mirror: build a local stand-in for python:3.11-slim with debootstrap, so the bento's generated
# Dockerfile (FROM python:3.11-slim) builds with `--pull=never`. Uses podman with runc.
# On a machine that can pull, you never need this: docker or podman fetch the real base image.
set -euo pipefail
tag=docker.io/library/python:3.11-slim
podman=(podman --runtime runc)
if "${podman[@]}" image exists "$tag"; then
  echo "$tag already present"; exit 0
fi
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "debootstrap bookworm (python3 3.11) from $mirror ..."
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log"; exit 1; }
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*  # debootstrap's downloads
tar -C "$work/rootfs" -c . | "${podman[@]}" import - localhost/debian-python:bookworm > /dev/null
cat > "$work/Containerfile" <<'CF'
FROM localhost/debian-python:bookworm
RUN ln -sf /usr/bin/python3 /usr/local/bin/python && python3 -m pip install --break-system-packages --no-cache-dir uv
ENV UV_NATIVE_TLS=1 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CF
ca=/etc/ssl/certs/ca-certificates.crt
"${podman[@]}" build --network=host --pull=never --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  ${ca:+-v $ca:$ca:ro} -t "$tag" "$work"
echo "built $tag"
