#!/usr/bin/env bash
# Start a Ray head node by hand on this machine (use on a few machines you can ssh into).
#   bash launch/ray/start_head.sh [PORT]            -> prints the address workers join
# Then on every worker machine:  bash launch/ray/start_worker.sh HEAD_IP:PORT
# And run jobs with `cluster: {address: auto}` (on the head) or `address: HEAD_IP:PORT`.
# Token authentication is on (launch/ray/auth.sh): the head creates ~/.ray/auth_token unless
# RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set; workers and clients need the same token.
set -euo pipefail
port=${1:-6379}
source "$(dirname "$0")/auth.sh"
ray_auth_setup generate
export RAY_USAGE_STATS_ENABLED=0
# Bind to the address other nodes reach; RAY_NODE_IP overrides the guess (e.g. an InfiniBand address).
node_ip=${RAY_NODE_IP:-$(hostname -I | awk '{print $1}')}
ray start --head --node-ip-address="$node_ip" --port="$port" \
  --num-gpus="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}" --include-dashboard=true --dashboard-host=127.0.0.1
echo "workers join with: bash launch/ray/start_worker.sh $node_ip:$port"
if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  echo "with the same token: copy $RAY_AUTH_TOKEN_PATH to each worker (or set RAY_AUTH_TOKEN_PATH there)"
fi
