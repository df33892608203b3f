#!/usr/bin/env bash
# A first run of moongate on one machine, as root, with nothing else set up.
#
# Every part runs on loopback: a private OpenSSH sshd stands in for a user's machine (its own
# host key, and the gateway's key in authorized_keys limited to the LLM port), mg-upstream
# streams newline-delimited JSON the way Ollama does, and moongate runs with its built-in
# default policy, configured through the environment. Then a streamed request goes through
# with curl -N, and moongate drains and stops on SIGTERM. Everything stops on exit.
#
#   examples/demo.sh [BUILD_DIR]        (default: build)
#   DEMO_KEEP_RUNNING=1 examples/demo.sh   leaves the gateway up until Ctrl-C
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$here/build}" && pwd)
dir=$(mktemp -d /tmp/moongate-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

wait_port() { # PORT: until something listens on 127.0.0.1:PORT (5 s at most)
    for _ in $(seq 50); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "demo: nothing listens on 127.0.0.1:$1" >&2
    return 1
}
free_port() {
    local p
    for _ in $(seq 50); do
        p=$(shuf -i 20000-60000 -n 1)
        (exec 3<>/dev/tcp/127.0.0.1/"$p") 2>/dev/null || { echo "$p"; return; }
    done
    return 1
}

echo "== keys (in $dir)"
ssh-keygen -q -t ed25519 -N '' -C demo-host -f "$dir/host_key"
ssh-keygen -q -t ed25519 -N '' -C moongate-gateway -f "$dir/gateway_key"

echo "== the LLM server: mg-upstream on loopback"
"$build/tests/mg-upstream" -l 127.0.0.1:0 --port-file "$dir/upstream.port" >"$dir/upstream.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -s "$dir/upstream.port" ] && break; sleep 0.1; done
up_port=$(cat "$dir/upstream.port")

echo "== the user's machine: sshd on 127.0.0.1, the gateway's key limited to port $up_port"
ssh_port=$(free_port)
echo "restrict,port-forwarding,permitopen=\"127.0.0.1:$up_port\" $(cat "$dir/gateway_key.pub")" \
    >"$dir/authorized_keys"
echo "[127.0.0.1]:$ssh_port $(cut -d' ' -f1,2 "$dir/host_key.pub")" >"$dir/known_hosts"
cat >"$dir/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $ssh_port
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AllowTcpForwarding yes
CONF
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>"$dir/sshd.log" &
pids+=($!)
wait_port "$ssh_port"

echo "== moongate with its default policy (configured by MOONGATE_* variables)"
gw_port=$(free_port)
token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
MOONGATE_TOKENS="alice:$token" \
MOONGATE_SSH_HOST=127.0.0.1 MOONGATE_SSH_PORT="$ssh_port" MOONGATE_SSH_USER="$(id -un)" \
MOONGATE_SSH_KEY="$dir/gateway_key" MOONGATE_KNOWN_HOSTS="$dir/known_hosts" \
MOONGATE_TARGET_HOST=127.0.0.1 MOONGATE_TARGET_PORT="$up_port" \
    "$build/moongate" -l "127.0.0.1:$gw_port" 2>"$dir/moongate.log" &
gw_pid=$!
pids+=($gw_pid)
wait_port "$gw_port"
url="http://127.0.0.1:$gw_port"

echo
echo "\$ curl $url/healthz"
curl -s "$url/healthz"
echo "\$ curl $url/api/generate          # no token"
curl -s "$url/api/generate"; echo
echo "\$ curl -N -H 'Authorization: Bearer …' '$url/stream?chunks=8&interval_ms=250'"
curl -sN -H "Authorization: Bearer $token" "$url/stream?chunks=8&interval_ms=250&size=8" |
    while IFS= read -r line; do printf '%s  %s\n' "$(date +%T.%3N)" "$line"; done
echo

if [ "${DEMO_KEEP_RUNNING:-0}" = 1 ]; then
    echo "moongate is up at $url (token: $token); Ctrl-C stops everything"
    wait "$gw_pid"
    exit 0
fi
echo "== SIGTERM: moongate drains and exits"
kill -TERM "$gw_pid"
wait "$gw_pid" && echo "moongate exited 0"
echo "== moongate's log"
cat "$dir/moongate.log"
