#!/bin/bash
# Builds a real kube-apiserver (v1.20.2) and takes etcd 3.4, from Debian bookworm
# packages only: no registry ships a ready kube-apiserver/envtest binary, and the
# bookworm source package `kubernetes` carries the whole upstream tree with vendor/.
# Nothing is installed system-wide: a private apt config, debs unpacked with dpkg -x.
#
# Usage: build-kube-apiserver.sh OUTDIR      -> OUTDIR/bin/{kube-apiserver,etcd}
# Needs: Debian 12 (apt-get, dpkg), network access to the Debian archive.
# Cost measured: ~2.5 min on 2 cores, 1.3 GB peak memory, 2.2 GB scratch disk.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: $0 OUTDIR}")
K8S_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
START=$(date +%s)
step() { echo "[build-kube-apiserver +$(( $(date +%s) - START ))s] $*"; }

W=$(mktemp -d "${TMPDIR:-/tmp}/kas-build.XXXXXX")
trap 'rm -rf "$W"' EXIT
mkdir -p "$W"/apt/{lists/partial,cache/archives/partial,parts} "$W"/debs "$W"/root "$OUT"/bin

# Binary and source indexes from the machine's own Debian mirrors. Fresh Debian 12
# installs keep them either in deb822 debian.sources (cloud/container images) or
# in one-line sources.list (the installer); fall back to deb.debian.org.
write_sources() {
  local d822=/etc/apt/sources.list.d/debian.sources one=/etc/apt/sources.list
  if [ -s "$d822" ]; then
    sed 's/^Types: deb$/Types: deb deb-src/' "$d822" > "$W"/apt/parts/debian.sources
  elif [ -s "$one" ] && grep -q '^deb ' "$one"; then
    sed -n 's/^deb \(.*\)$/deb \1\ndeb-src \1/p' "$one" > "$W"/apt/parts/debian.list
  else
    cat > "$W"/apt/parts/debian.sources <<SRC
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
}
write_sources
cat > "$W"/apt/apt.conf <<AC
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$W/apt/parts";
Dir::State::Lists "$W/apt/lists";
Dir::Cache "$W/apt/cache";
AC
# As root apt would hand downloads to user _apt, who cannot enter our 0700 mktemp dir.
[ "$(id -u)" = 0 ] && echo 'APT::Sandbox::User "root";' >> "$W"/apt/apt.conf
export APT_CONFIG=$W/apt/apt.conf
step "apt-get update (private lists in $W)"
apt-get -qq update

DEBS="golang-1.19-go golang-1.19-src etcd-server golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev"
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

export GOROOT=$W/root/usr/lib/go-1.19 PATH=$W/root/usr/lib/go-1.19/bin:$PATH
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
step "go build ./cmd/kube-apiserver (the long part, a few minutes)"
# Build to a temporary name and rename, so a killed build never leaves a
# half-written binary that a later run would take as ready.
go build -ldflags "$LD" -o "$OUT"/bin/.kube-apiserver.tmp ./cmd/kube-apiserver
cp "$W"/root/usr/bin/etcd "$OUT"/bin/.etcd.tmp
mv "$OUT"/bin/.etcd.tmp "$OUT"/bin/etcd
mv "$OUT"/bin/.kube-apiserver.tmp "$OUT"/bin/kube-apiserver
"$OUT"/bin/kube-apiserver --version
"$OUT"/bin/etcd --version | head -1
step "done: $OUT/bin/{kube-apiserver,etcd}"
