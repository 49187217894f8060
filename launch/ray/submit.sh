#!/usr/bin/env bash
# Submit an index (or any tributary command) to a running cluster as a Ray job:
#   RAY_ADDRESS=http://HEAD_IP:8265 bash launch/ray/submit.sh configs/gpt2-cluster.yaml
# The working directory (configs, data) is uploaded; the job's driver runs on the head node and its
# config should say `cluster: {address: auto}`. Follow it with `ray job logs -f JOB_ID`.
# Needs the cluster's token (launch/ray/auth.sh): RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
set -euo pipefail
config=${1:?usage: submit.sh CONFIG [tributary index options]}
shift
source "$(dirname "$0")/auth.sh"
ray_auth_setup
ray job submit --working-dir . \
  --runtime-env-json='{"excludes": [".venv", "runs", ".git"]}' \
  -- tributary index "$config" "$@"
