#!/usr/bin/env bash
# Builds the tso image from a binary built on this machine:
#
#   deploy/build-image.sh target/release/tso tso:0.1.0
#
# The image is FROM scratch (see deploy/Containerfile). This script assembles its build
# context in a temporary directory: the binary, the shared libraries `ldd` names, the glibc
# name-service modules glibc loads at run time, and the few files of /etc they read; then runs
# `buildah build`. Storage options come from the usual containers configuration, e.g.
# CONTAINERS_STORAGE_CONF, or BUILDAH_OPTS="--root DIR --runroot DIR --storage-driver vfs".
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 BINARY TAG   (e.g. $0 target/release/tso tso:0.1.0)" >&2
    exit 2
fi
binary=$1
tag=$2
here=$(cd "$(dirname "$0")" && pwd)

[ -x "$binary" ] || { echo "$0: $binary is not an executable file" >&2; exit 2; }
command -v buildah >/dev/null 2>&1 ||
    { echo "$0: buildah is missing: install Debian's buildah package (scripts/test does)" >&2; exit 1; }

context=$(mktemp -d "${TMPDIR:-/tmp}/tso-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
root=$context/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$root/var/lib" "$context/data/tso"
chmod 1777 "$root/tmp"
chmod 0700 "$context/data/tso"
cp "$binary" "$root/usr/local/bin/tso"
chmod 0755 "$root/usr/local/bin/tso"

# Copies a library into the image at the path it has on this machine (symlinks resolved, so
# the image holds the file itself whatever the host's usr-merge layout).
copy_lib() {
    local path=$1
    mkdir -p "$root$(dirname "$path")"
    cp -L "$path" "$root$path"
}

# What the dynamic linker loads at start: every `name => /path` line, and the loader itself.
libs=$(ldd "$binary" | awk '/=>/ && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[ -n "$libs" ] || { echo "$0: ldd names no libraries for $binary (not a glibc binary?)" >&2; exit 1; }
libdir=
for lib in $libs; do
    copy_lib "$lib"
    case $lib in */libc.so.*) libdir=$(dirname "$lib") ;; esac
done
[ -n "$libdir" ] || { echo "$0: $binary is not linked against glibc's libc.so.6" >&2; exit 1; }

# What glibc loads later, with dlopen, to resolve names through /etc/nsswitch.conf: the
# `files` and `dns` modules and the resolver library. Since glibc 2.34 these are built into
# libc.so.6 and the files below are small compatibility stubs; an older glibc needs them.
for name in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
    if [ -e "$libdir/$name" ]; then
        copy_lib "$libdir/$name"
    elif [ "$name" = libnss_files.so.2 ]; then
        echo "$0: $libdir/$name is missing: names in /etc/hosts would not resolve" >&2
        exit 1
    fi
done

cat >"$root/etc/nsswitch.conf" <<'CONF'
passwd: files
group: files
hosts: files dns
CONF
cat >"$root/etc/hosts" <<'CONF'
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
CONF
cat >"$root/etc/passwd" <<'CONF'
root:x:0:0:root:/root:/sbin/nologin
tso:x:65532:65532:tso:/var/lib/tso:/sbin/nologin
CONF
cat >"$root/etc/group" <<'CONF'
root:x:0:
tso:x:65532:
CONF

# Build-time facts as labels: which binary went in, and the glibc it needs.
glibc=$("$libdir/libc.so.6" 2>/dev/null | head -n1 || true)
# shellcheck disable=SC2086 # BUILDAH_OPTS is a list of options
buildah ${BUILDAH_OPTS:-} build \
    --file "$here/Containerfile" \
    --tag "$tag" \
    --label "org.opencontainers.image.title=tso" \
    --label "tso.glibc=${glibc:-unknown}" \
    "$context"
