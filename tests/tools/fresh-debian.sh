#!/bin/bash
# `make test` (CI's .ci/run) on a fresh Debian root: what "passes on a fresh Debian 12
# and Debian 13" means, checked on one machine of either release.
#
#   tests/tools/fresh-debian.sh trixie|bookworm [--keep] [--seed-kube-cache]
#
# debootstrap's minbase plus the README's start list (make git ca-certificates python3
# python3-venv), in /var/tmp/planewatch-fresh-RELEASE; this checkout's HEAD cloned
# into it; .ci/run chrooted there. The root is bound onto itself (`ip netns exec`
# remounts / as a slave: / must be a mount point, as on a real machine) and gets its
# own /proc and /run; /sys and /dev are the host's (cgroups, bpffs, devices).
# The host's local CAs (/usr/local/share/ca-certificates) and /etc/pip.conf are
# copied in: a machine behind a TLS-inspecting proxy needs them, as the host does.
#
# --seed-kube-cache copies ~/.cache/planewatch/kube-v1.20.2 in (the Kubernetes
# binaries tests/node_bins.py otherwise builds from Debian's source: many minutes);
# without it the build runs too. --keep leaves the root (to rerun faster: its
# packages and venv stay); else it is removed. Mounts are always undone, and
# every process whose root is still the chroot is killed by PID at the end.
set -uo pipefail
RELEASE=${1:?usage: $0 bookworm|trixie [--keep] [--seed-kube-cache]}
shift
KEEP=0 SEED=0
for arg in "$@"; do
  case $arg in
    --keep) KEEP=1 ;;
    --seed-kube-cache) SEED=1 ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/../.." && pwd)
R=/var/tmp/planewatch-fresh-$RELEASE
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

in_root() {  # PIDs whose root directory is the chroot
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$R" ] && echo "${p#/proc/}"
  done
}
cleanup() {
  for pid in $(in_root); do kill -KILL "$pid" 2>/dev/null; done
  for m in $(awk -v r="$R" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null
  done
  [ "$KEEP" = 1 ] || rm -rf --one-file-system "$R" "$R.debootstrap.log"
}
trap cleanup EXIT

if [ ! -x "$R/usr/bin/python3" ]; then
  debootstrap --variant=minbase --include=make,git,ca-certificates,python3,python3-venv \
    "$RELEASE" "$R" "$MIRROR" >"$R.debootstrap.log" 2>&1 || { tail -20 "$R.debootstrap.log"; exit 1; }
fi
mount --bind "$R" "$R" && mount --make-private "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys" && mount --make-rslave "$R/sys"
mount --rbind /dev "$R/dev" && mount --make-rslave "$R/dev"
mount -t tmpfs tmpfs "$R/run"
find "$R/tmp" -mindepth 1 -delete
cp /etc/resolv.conf "$R/etc/resolv.conf"
cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/" 2>/dev/null &&
  chroot "$R" update-ca-certificates >/dev/null
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$R/etc/pip.conf"
rm -rf "$R/root/planewatch"
git clone -q "$REPO" "$R/root/planewatch"
if [ "$SEED" = 1 ] && [ -d "$HOME/.cache/planewatch/kube-v1.20.2" ]; then
  mkdir -p "$R/root/.cache/planewatch"
  cp -a "$HOME/.cache/planewatch/kube-v1.20.2" "$R/root/.cache/planewatch/"
fi
echo ">> Debian $(cat "$R/etc/debian_version") in $R, planewatch $(git -C "$REPO" rev-parse --short HEAD)"
chroot "$R" /usr/bin/env -i HOME=/root TERM=dumb \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  bash -c 'cd /root/planewatch && bash .ci/run'
rc=$?
echo ">> .ci/run on Debian $RELEASE: exit $rc"
exit $rc
