# planewatch — the two commands a new user runs:
#   make run    bring up the lab and serve /metrics on it (Ctrl-C tears it down)
#   make test   run every test
#   make node-up / make node-down   a real single-node Kubernetes (tests/node.py)
# Both install what they need first (Debian packages, a venv, the BPF objects, kernel/nlbatch.c built).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LISTEN ?= 127.0.0.1:9808
# procps: sysctl, which the lab runs in every namespace; minimal Debian roots
# (debootstrap, container images) lack it. containerd ... git: the real node of
# tests/node.py (runtime, CNI plugins, the image built with buildah on an
# mmdebstrap base, busybox-static for workload pods, gcc for the static pause).
# netavark: buildah's network backend; trixie's buildah is built without CNI
# support and refuses to start without it, even for --network host builds.
APT_PACKAGES := clang llvm libbpf-dev libbpf1 zlib1g-dev bpftool iproute2 nftables iputils-ping iperf3 libcap2-bin \
                openssl procps python3-venv prometheus prometheus-node-exporter \
                containerd runc containernetworking-plugins iptables conntrack socat \
                buildah netavark mmdebstrap busybox-static gcc libc6-dev git

.PHONY: deps apt venv ebpf kernel run lint test test-quick bench lab-down node-up node-down kube-bins generate clean

deps: apt venv ebpf kernel

apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo ">> installing Debian packages: $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo ">> python venv in $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip >/dev/null
	@$(BIN)/pip install -q -e '.[test]'
	@touch $@

ebpf:
	@$(MAKE) -s -C ebpf

# the netlink batch (counters, neighbour gets) and the gzip stream the collector calls with
# ctypes (kernel/nlbatch.c, kernel/gzstream.c)
kernel:
	@$(MAKE) -s -C kernel

run: deps
	$(BIN)/python -m lab run --web.listen-address $(LISTEN)

# ruff and mypy, pinned in the test extras, configured in pyproject.toml
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: deps kube-bins
	$(MAKE) -s lint
	$(BIN)/python -m pytest -q tests

# The root-free tier (tests not marked `root`): under a minute, no kernel objects, in
# pytest-xdist workers; as root it runs as uid 65534 with no capabilities
# (tests/tools/quick-tier.sh; extra pytest arguments: make test-quick ARGS='-k http').
test-quick: venv kernel
	BIN=$(BIN) tests/tools/quick-tier.sh $(ARGS)

# Kubernetes v1.20.2 binaries for tests/kubeapi.py and the real node (tests/node.py),
# built once into ~/.cache/planewatch from Debian's source (minutes the first time).
kube-bins: venv
	$(BIN)/python -m tests.node_bins

bench: deps
	$(BIN)/python bench/scrape.py

generate: venv
	$(BIN)/python deploy/rules/generate.py
	$(BIN)/python dashboards/generate.py
	$(BIN)/python deploy/generate.py

NODE ?= pwnode
node-up: deps
	$(BIN)/python -m tests.node up $(NODE)

node-down: venv
	$(BIN)/python -m tests.node down $(NODE)

lab-down: venv
	$(BIN)/python -m lab down

clean:
	rm -rf $(VENV) ebpf/build
