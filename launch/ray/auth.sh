# Ray token authentication for a cluster of several machines (Ray >= 2.52), sourced by the launch scripts.
# https://docs.ray.io/en/latest/ray-security/token-auth.html
#
# With RAY_AUTH_MODE=token (the default here) the GCS, the dashboard, the job API and every node-to-node
# call require one shared token. Every node and every client (`ray job submit`, a driver with
# `cluster.address: auto`) needs the same token, from (Ray's own order):
#   RAY_AUTH_TOKEN       the token itself, in the environment (e.g. from a secret manager);
#   RAY_AUTH_TOKEN_PATH  a file holding it (mode 600, on a file system every node reads, or copied);
#   ~/.ray/auth_token    the default file.
# The head node creates the file when none of these is set. These scripts never print the token, and
# never expand it in a command (so even `bash -x` shows no token). RAY_AUTH_MODE=disabled turns
# authentication off: only on a network nobody else can reach.

# ray_auth_setup [generate]: export RAY_AUTH_MODE and, unless RAY_AUTH_TOKEN is set, RAY_AUTH_TOKEN_PATH;
# with `generate`, create the token file if it is missing. Fails (status 1) when no token is found.
ray_auth_setup() {
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
  if [ "$RAY_AUTH_MODE" != token ]; then
    echo "warning: Ray token authentication is off (RAY_AUTH_MODE=$RAY_AUTH_MODE): anyone who reaches the cluster's ports can run code on it" >&2
    return 0
  fi
  if [ -n "${RAY_AUTH_TOKEN:+set}" ]; then
    return 0
  fi
  local file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  if [ ! -s "$file" ]; then
    if [ "${1:-}" != generate ]; then
      echo "error: Ray token authentication is on but no token was found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to the head node's token file (default $HOME/.ray/auth_token)" >&2
      return 1
    fi
    (umask 077 && mkdir -p "$(dirname "$file")" && "${PYTHON:-python3}" -c 'import secrets; print(secrets.token_hex(32))' >"$file")
    echo "created a Ray auth token in $file (mode 600); give every node and client the same file" >&2
  fi
  export RAY_AUTH_TOKEN_PATH=$file
}
