#!/usr/bin/env bash
# A first run of moongate on one machine, as root, with nothing else set up.
#
# It plays every part on loopback: a private OpenSSH sshd stands in for a user's machine (its own
# host key, and the gateway's key in authorized_keys, limited to the LLM port), a small upstream
# streams newline-delimited JSON the way Ollama does, and moongate's core takes a lease from a
# pool of SSH connections and fetches through a direct-tcpip channel. Everything stops on exit.
#
#   examples/demo.sh [BUILD_DIR]        (default: build)
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

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        shuf -i 20000-60000 -n 1
}

echo "== keys (in $dir)"
ssh-keygen -q -t ed25519 -N '' -C demo-host -f "$dir/host_key"
ssh-keygen -q -t ed25519 -N '' -C moongate-gateway -f "$dir/gateway_key"

echo "== the upstream: an LLM-like server on loopback"
"$build/tests/mg-upstream" -l 127.0.0.1:0 --port-file "$dir/upstream.port" >"$dir/upstream.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -s "$dir/upstream.port" ] && break; sleep 0.1; done
up_port=$(cat "$dir/upstream.port")

echo "== the user's side: sshd on 127.0.0.1, gateway key limited to port $up_port"
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
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$ssh_port") 2>/dev/null && break; sleep 0.1; done

echo "== moongate: pool -> SSH -> channel -> GET /stream (5 chunks, 300 ms apart)"
"$build/examples/moongate-fetch" -h 127.0.0.1 -p "$ssh_port" -u "$(id -un)" \
    -k "$dir/gateway_key" -K "$dir/known_hosts" -t "127.0.0.1:$up_port" -U alice \
    "/stream?chunks=5&interval_ms=300&size=16"
echo "== done"
