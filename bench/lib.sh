# bench/lib.sh: what the benchmark scripts share (sourced, not run): bookkeeping of the
# processes they start, free ports, arithmetic on measured figures (which may read "fail"), and
# the private mg-upstream and OpenSSH sshd on 127.0.0.1 that every scenario talks to.
#
# A script sets upstream_bin, then calls bench_init (the temp dir $dir, the list $pids of what
# it starts, and the traps that stop them on exit), then start_upstream and start_sshd.

die() { echo "bench: $*" >&2; exit 1; }

bench_init() {
    dir=$(mktemp -d /tmp/moongate-bench.XXXXXX)
    pids=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# Every pid below was started by this script; sshd's per-connection children are its descendants.
descendants() {
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$c"
        descendants "$c"
    done
}
stop_pid() {  # pid [grace seconds]: SIGTERM, wait, then SIGKILL the pid and what it started
    local pid=$1 grace=${2:-3} kids i
    kill -0 "$pid" 2>/dev/null || return 0
    kids=$(descendants "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$pid" $kids 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[i]}" 2; done
    if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: kept $dir" >&2; else rm -rf "$dir"; fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        shuf -i 20000-60000 -n 1
}
wait_port() {  # port pid: 0 once 127.0.0.1:port accepts, 1 if pid exited or 10 s passed
    local i
    for ((i = 0; i < 200; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
calc() { awk "BEGIN { printf \"%s\", $* }"; }                # calc 'expr' -> number text
num() { [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; }                # is $1 a measured number?
ratio() { if num "$1" && num "$2" && [ "$(calc "($2 > 0)")" = 1 ]; then calc "sprintf(\"%.2fx\", $1 / $2)"; else echo "-"; fi; }
verdict() { if num "$1"; then [ "$(calc "($2)")" = 1 ] && echo PASS || echo MISS; else echo "$3"; fi; }
rss() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo fail; }

# start_upstream: mg-upstream on a port it picks; sets up_pid and up_port.
start_upstream() {
    "$upstream_bin" -l 127.0.0.1:0 --port-file "$dir/upstream.port" >"$dir/upstream.log" 2>&1 &
    pids+=($!)
    up_pid=$!
    for _ in $(seq 100); do [ -s "$dir/upstream.port" ] && break; sleep 0.05; done
    [ -s "$dir/upstream.port" ] || die "mg-upstream did not start: $(cat "$dir/upstream.log")"
    up_port=$(cat "$dir/upstream.port")
}

# start_sshd MAXSTARTUPS: a private sshd with fresh ed25519 keys, the gateway's key limited to
# the upstream's port as a user would set it up; sets ssh_user, ssh_port and sshd_pid, and
# leaves $dir/gateway_key, $dir/known_hosts and $dir/host_key.pub for the gateways.
start_sshd() {
    ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -C bench-gateway -f "$dir/gateway_key"
    ssh_user=$(id -un)
    ssh_port=$(free_port)
    # The gateway's key is limited to the upstream's port, as a user would set it up.
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
MaxStartups $1
LogLevel ERROR
CONF
    [ "$(id -u)" = 0 ] && mkdir -p /run/sshd
    /usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>"$dir/sshd.log" &
    pids+=($!)
    sshd_pid=$!
    wait_port "$ssh_port" "${pids[-1]}" || die "sshd did not start: $(cat "$dir/sshd.log")"
}
