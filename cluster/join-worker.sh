#!/usr/bin/env bash
# Bare metal: join this machine to the Ray head as a worker (GPUs are detected).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HEAD_IP:?set HEAD_IP to the private address of the head}"
: "${NODE_IP:?set NODE_IP to the private address of this machine}"
export RAY_USAGE_STATS_ENABLED=0
.venv/bin/ray start --address="$HEAD_IP:6379" --node-ip-address="$NODE_IP" --disable-usage-stats
