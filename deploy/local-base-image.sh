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
# uv, which the bento's Dockerfile installs with pip where the base has none: the project's locked uv, so the
# base needs no pip (and the image carries the uv the lock names)
uv=${UV:-$(dirname "$0")/../.venv/bin/uv}
[ -x "$uv" ] || { echo "no uv at $uv: run ./run.sh test (or set UV=/path/to/uv)"; exit 1; }
echo "debootstrap bookworm (python3 3.11) from $mirror ..."
debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log"; exit 1; }
# debootstrap's downloads, and what python:3.11-slim leaves out too: documentation and translations
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"* \
       "$work/rootfs/usr/share/doc/"* "$work/rootfs/usr/share/man/"* "$work/rootfs/usr/share/info/"* \
       "$work/rootfs/usr/share/locale/"*
tar -C "$work/rootfs" -c . | "${podman[@]}" import - localhost/debian-python:bookworm > /dev/null
cp "$uv" "$work/uv"
cat > "$work/Containerfile" <<'CF'
FROM localhost/debian-python:bookworm
COPY uv /usr/local/bin/uv
RUN ln -sf /usr/bin/python3 /usr/local/bin/python
ENV UV_NATIVE_TLS=1 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CF
ca=/etc/ssl/certs/ca-certificates.crt
"${podman[@]}" build --network=host --pull=never --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  ${ca:+-v $ca:$ca:ro} -t "$tag" "$work"
echo "built $tag"
