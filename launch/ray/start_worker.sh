#!/usr/bin/env bash
# Join this machine to a running Ray head:  bash launch/ray/start_worker.sh HEAD_IP:PORT
# Needs the head's token (launch/ray/auth.sh): RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
set -euo pipefail
head=${1:?usage: start_worker.sh HEAD_IP:PORT}
source "$(dirname "$0")/auth.sh"
ray_auth_setup
export RAY_USAGE_STATS_ENABLED=0
node_ip=${RAY_NODE_IP:-$(hostname -I | awk '{print $1}')}
ray start --address="$head" --node-ip-address="$node_ip" \
  --num-gpus="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
