#!/bin/sh
# One-off: renders docs/images/loss-per-plane.png
# (see docs/demo.md). Needs root, Debian's prometheus and chromium.
#
# The lab (demo pods + the SR-IOV fixture pod), `planewatch serve` on it and
# Prometheus with the project's rules; 30 s of traffic on every plane, then 45 s
# more with an MTU mismatch on the data plane (the node side of upf-a's net2 at
# MTU 1000 while upf-a sends 1200-byte datagrams: veth counts them as tx_dropped);
# then headless Chromium takes Prometheus's graph of the loss-per-plane rule.
set -eu
cd "$(dirname "$0")/.."
PREFIX=pwshot
PW=127.0.0.1:9818
PROM=127.0.0.1:9819
WORK=$(mktemp -d)
PIDS=""

cleanup() {
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    python3 -m lab down --prefix $PREFIX >/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

python3 -m lab up --prefix $PREFIX --sriov-fixture
python3 -m exporters serve --web.listen-address $PW --node-name lab-node \
    --pods-file /run/planewatch-lab/$PREFIX-pods.json \
    --path.sysfs /run/planewatch-lab/$PREFIX-sysfs >"$WORK/planewatch.log" 2>&1 &
PIDS="$PIDS $!"

cat >"$WORK/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [$PWD/deploy/rules/planewatch-rules.yaml]
scrape_configs:
  - job_name: planewatch
    honor_labels: true
    static_configs: [{targets: ['$PW']}]
    relabel_configs: [{target_label: node, replacement: lab-node}]
EOF
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
    --web.listen-address=$PROM >"$WORK/prometheus.log" 2>&1 &
PIDS="$PIDS $!"
sleep 3

python3 - $PREFIX <<'EOF'
import subprocess, sys, time
from lab.topology import LabState, warm_up
from lab.traffic import udp_send

state = LabState.load(sys.argv[1])
upf_a, upf_b_data = state.pod_ns["telco/upf-a"], state.addresses["telco/upf-b"]["net2"][0]
peer = f"{state.prefix[:4]}0h2"          # node side of upf-a's net2 (lab/topology.py naming)
for second in range(75):
    if second == 30:
        subprocess.run(["ip", "-n", state.node_ns, "link", "set", peer, "mtu", "1000"], check=True)
    warm_up(state, 20)                     # every pod to upf-a, on every network they share
    if second >= 30:
        udp_send(upf_a, upf_b_data, 5, size=1200)
    time.sleep(1)
EOF
sleep 3

shot() {  # shot <url path> <png>
    profile=$(mktemp -d)
    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
        --window-size=1280,1000 --virtual-time-budget=8000 --screenshot="$2" "http://$PROM$1" 2>/dev/null
    rm -rf "$profile"
}
mkdir -p docs/images
shot "/classic/graph?g0.expr=plane%3Aplanewatch_interface_loss%3Aratio_rate5m&g0.tab=0&g0.stacked=0&g0.range_input=2m" \
    docs/images/loss-per-plane.png
curl -s "http://$PROM/api/v1/query?query=plane:planewatch_interface_loss:ratio_rate5m"; echo
