#!/bin/bash
# Builds Kubernetes v1.20.2 binaries (kube-apiserver by default) and takes etcd 3.4,
# from Debian bookworm packages only: no registry ships a ready kube-apiserver/envtest
# binary, and bookworm's source package `kubernetes` carries the whole upstream tree
# with vendor/. Nothing is installed system-wide: a private apt config, debs unpacked
# with dpkg -x.
#
# Usage: build-kube-apiserver.sh OUTDIR [CMD...]  -> OUTDIR/bin/{CMD...,etcd}
#   CMD: directories under cmd/ of the Kubernetes tree (default: kube-apiserver),
#   e.g. kube-apiserver kubelet kube-controller-manager kube-scheduler kubectl;
#   and `pause`: build/pause/linux/pause.c compiled statically (the sandbox image).
#   Binaries already in OUTDIR/bin are kept, not rebuilt: one run builds only
#   what is missing, all from the same tree and Go build cache (after
#   kube-apiserver, incremental: kubelet ~100 s, controller-manager ~75 s,
#   scheduler ~26 s on 2 cores).
# Needs: Debian 12 or 13 (apt-get, dpkg), network access to the Debian archive.
# Whatever the host runs, the source package and the Go toolchain are bookworm's,
# asked for by suite name: trixie and later do not carry them.
# Cost measured: ~2.5 min on 2 cores for kube-apiserver, 1.3 GB peak memory,
# 2.2 GB scratch disk.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: $0 OUTDIR [CMD...]}")
shift
WANTED=("${@:-kube-apiserver}")
TARGETS=()
for T in "${WANTED[@]}"; do
  [ -x "$OUT/bin/$T" ] || TARGETS+=("$T")
done
if [ ${#TARGETS[@]} = 0 ] && [ -x "$OUT/bin/etcd" ]; then
  echo "[build-kube-apiserver] all of ${WANTED[*]} and etcd already in $OUT/bin"
  exit 0
fi
SUITE=bookworm
K8S_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
GO_VERSION=1.19
START=$(date +%s)
step() { echo "[build-kube-apiserver +$(( $(date +%s) - START ))s] $*"; }

W=$(mktemp -d "${TMPDIR:-/tmp}/kas-build.XXXXXX")
trap 'rm -rf "$W"' EXIT
mkdir -p "$W"/apt/{lists/partial,cache/archives/partial,parts} "$W"/debs "$W"/root "$OUT"/bin

# The machine's own Debian mirrors (a local mirror or proxy keeps working), but
# bookworm's suites, named explicitly. Fresh installs keep the mirrors either in
# deb822 *.sources (cloud/container images, trixie) or in one-line *.list (the
# bookworm installer); deb.debian.org when none is found.
CODENAMES='bullseye|bookworm|trixie|forky|duke|sid|oldoldstable|oldstable|stable|testing|unstable'
mirror_uris() {  # prints "main URI" and "security URI" lines found on this machine
  local f
  { for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -s "$f" ] || continue
    # deb [options] URI SUITE COMPONENT...
    sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\)[[:space:]]\+\([^[:space:]]\+\).*/\2 \3/p' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
         { uris = ""; suites = ""; deb = 0; off = 0
           for (i = 1; i <= NF; i++) {
             if ($i ~ /^Types:/ && $i ~ /[[:space:]]deb([[:space:]]|$)/) deb = 1
             if ($i ~ /^Enabled:[[:space:]]*no/) off = 1
             if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[[:space:]]*/, "", uris) }
             if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[[:space:]]*/, "", suites) } }
           if (deb && !off) { n = split(uris, u, /[[:space:]]+/); m = split(suites, s, /[[:space:]]+/)
             for (a = 1; a <= n; a++) for (b = 1; b <= m; b++) print u[a], s[b] } }' "$f"
  done; } | awk -v re="^($CODENAMES)" '
    $2 ~ re"-security$" || $2 ~ re"/updates$" { if (!sec) sec = $1; next }
    $2 ~ re"(-updates)?$"                     { if (!main) main = $1 }
    END { print "main", (main ? main : "http://deb.debian.org/debian")
          print "security", (sec ? sec : "http://deb.debian.org/debian-security") }'
}
# Keyring: debian-archive-keyring carries the current and previous releases' keys
# (trixie's still verifies bookworm); its file name moved from .gpg to .pgp.
KEYRING=
for k in /usr/share/keyrings/debian-archive-keyring.pgp /usr/share/keyrings/debian-archive-keyring.gpg; do
  [ -s "$k" ] && { KEYRING=$k; break; }
done
[ -n "$KEYRING" ] || { echo "no Debian archive keyring (install debian-archive-keyring)" >&2; exit 1; }
MAIN_URI=$(mirror_uris | awk '$1 == "main" { print $2 }')
SEC_URI=$(mirror_uris | awk '$1 == "security" { print $2 }')
cat > "$W"/apt/parts/debian.sources <<SRC
Types: deb deb-src
URIs: $MAIN_URI
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: $KEYRING

Types: deb deb-src
URIs: $SEC_URI
Suites: $SUITE-security
Components: main
Signed-By: $KEYRING
SRC
cat > "$W"/apt/apt.conf <<AC
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$W/apt/parts";
Dir::State::Lists "$W/apt/lists";
Dir::Cache "$W/apt/cache";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$W/apt/parts";
AC
# As root apt would hand downloads to user _apt, who cannot enter our 0700 mktemp dir.
[ "$(id -u)" = 0 ] && echo 'APT::Sandbox::User "root";' >> "$W"/apt/apt.conf
export APT_CONFIG=$W/apt/apt.conf
step "apt-get update ($SUITE from $MAIN_URI and $SEC_URI, private lists in $W)"
apt-get -qq update

DEBS="golang-$GO_VERSION-go golang-$GO_VERSION-src etcd-server golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev"
# dpkg-source (dpkg-dev) is not part of a minimal Debian: unpack it privately too.
command -v dpkg-source >/dev/null && command -v patch >/dev/null && command -v xz >/dev/null \
  || DEBS="$DEBS dpkg-dev libdpkg-perl patch xz-utils"
step "downloading $DEBS"
(cd "$W"/debs && apt-get -qq download $DEBS)
for f in "$W"/debs/*.deb; do dpkg -x "$f" "$W"/root; done
export PATH=$PATH:$W/root/usr/bin PERL5LIB=$W/root/usr/share/perl5${PERL5LIB:+:$PERL5LIB}

step "downloading and unpacking the kubernetes source package"
(cd "$W" && { apt-get -qq source --download-only "kubernetes=$K8S_SRC_VERSION" \
                || apt-get -qq source --download-only kubernetes; } \
   && dpkg-source -q -x kubernetes_*.dsc k8s >/dev/null)
# The ldflags below stamp v1.20.2: refuse any other upstream version.
head -1 "$W"/k8s/debian/changelog | grep -q '1\.20\.2' \
  || { echo "unexpected kubernetes source version:" >&2; head -1 "$W"/k8s/debian/changelog >&2; exit 1; }

# reflect2 1.0.1 (vendored) crashes under go >= 1.18 when serving custom resources:
# swap in Debian's reflect2 1.0.2 and json-iterator 1.1.12.
G=$W/root/usr/share/gocode/src/github.com
rm -rf "$W"/k8s/vendor/github.com/modern-go/reflect2 "$W"/k8s/vendor/github.com/json-iterator/go
cp -aL "$G"/modern-go/reflect2 "$W"/k8s/vendor/github.com/modern-go/
cp -aL "$G"/json-iterator/go "$W"/k8s/vendor/github.com/json-iterator/

export GOROOT=$W/root/usr/lib/go-$GO_VERSION PATH=$W/root/usr/lib/go-$GO_VERSION/bin:$PATH
export GOPATH=$W/gopath GOCACHE=$W/gocache CGO_ENABLED=0 GO111MODULE=off GOFLAGS=
mkdir -p "$GOPATH"/src/k8s.io && ln -sfn "$W"/k8s "$GOPATH"/src/k8s.io/kubernetes
cd "$GOPATH"/src/k8s.io/kubernetes

# The tarball lacks pkg/generated/openapi/zz_generated.openapi.go: generate it.
step "building openapi-gen and generating pkg/generated/openapi"
go build -o "$W"/openapi-gen ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
DIRS=$(find -H . -path ./_\* -prune -o -path './.*' -prune -o -path ./vendor -prune -o -path ./debian -prune -o -name '*.go' -print \
  | xargs grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | sort -u | sed 's|^\./staging/src/|vendor/|; s|^\./||' \
  | grep -vE '^vendor/k8s.io/(code-generator|sample-apiserver)/' | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
"$W"/openapi-gen -i "$DIRS" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$W"/violations.report

LD="-s -w"
for V in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  LD="$LD -X $V.gitVersion=v1.20.2 -X $V.gitMajor=1 -X $V.gitMinor=20 -X $V.gitTreeState=clean"
done
# Each binary is built to a temporary name and renamed, so a killed build never
# leaves a half-written binary that a later run would take as ready.
for T in "${TARGETS[@]}"; do
  if [ "$T" = pause ]; then
    # The pod sandbox: a static binary, so a one-layer image needs nothing else.
    step "cc -static build/pause/linux/pause.c"
    "${CC:-cc}" -Os -static -DVERSION=v1.20.2 -o "$OUT/bin/.$T.tmp" build/pause/linux/pause.c
    continue
  fi
  step "go build ./cmd/$T (kube-apiserver is the long part: a few minutes)"
  go build -ldflags "$LD" -o "$OUT/bin/.$T.tmp" "./cmd/$T"
done
cp "$W"/root/usr/bin/etcd "$OUT"/bin/.etcd.tmp
mv "$OUT"/bin/.etcd.tmp "$OUT"/bin/etcd
for T in "${TARGETS[@]}"; do
  mv "$OUT/bin/.$T.tmp" "$OUT/bin/$T"
  [ "$T" = pause ] && { "$OUT/bin/$T" -v; continue; }
  "$OUT/bin/$T" --version 2>/dev/null || "$OUT/bin/$T" version --client 2>/dev/null || true
done
# sed, not head: head exits after one line and etcd, still writing, would die of
# SIGPIPE, failing the whole build under pipefail (seen on a loaded machine).
"$OUT"/bin/etcd --version | sed -n 1p
step "done: $OUT/bin/{${TARGETS[*]},etcd}"
