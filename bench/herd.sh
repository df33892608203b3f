#!/usr/bin/env bash
# The herd benchmark: many distinct users arriving at the same moment (a gateway restart with
# every user coming back, a morning peak), each needing a new SSH connection, against one
# loopback sshd on this machine; with moongate's handshake bound against a baseline without one,
# measured in the same run. Then the memory of the idle tunnels the herd leaves behind.
#
#   bench/herd.sh [BUILD_DIR]         (default: build; needs BUILD_DIR/moongate and
#                                      BUILD_DIR/tests/mg-upstream, mg-streamclient; OpenSSH)
#
# Environment: HERD_USERS (default 1000); HERD_BOUNDS, the bounds of each run as
# MAX_HANDSHAKES/MAX_HANDSHAKES_PER_SERVER (0: none), the first being the baseline, "default"
# meaning moongate's own defaults (default "0/0 default"; e.g. "0/0 4/0 8/0 64/6" to compare
# bounds); HERD_MAXSTARTUPS, the sshd's
# MaxStartups (default OpenSSH's 10:30:100; e.g. 4000 for an sshd that drops nobody); HERD_PATH,
# what each user asks for (default /hello; /bytes/N leaves tunnels that streamed N bytes);
# HERD_QUEUE_TIMEOUT, how long each request may wait for its connection (QUEUE_TIMEOUT, default
# moongate's 30000 ms; shorter makes a herd that needs more time than that on this machine);
# BENCH_KEEP=1 keeps the temp dir.
# bench/README.md ("The herd") explains the figures. Exit status as bench/run.sh's.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -le 1 ] || { echo "usage: bench/herd.sh [BUILD_DIR]" >&2; exit 2; }
build=$(cd "${1:-$here/build}" 2>/dev/null && pwd) || { echo "bench: no build dir ${1:-$here/build}" >&2; exit 2; }
users=${HERD_USERS:-1000}
path=${HERD_PATH:-/hello}
queue_timeout=${HERD_QUEUE_TIMEOUT:-30000}
read -r -a bounds <<<"${HERD_BOUNDS:-0/0 default}"
upstream_bin=$build/tests/mg-upstream
client_bin=$build/tests/mg-streamclient
mg_bin=$build/moongate

. "$here/bench/lib.sh"
for tool in ssh-keygen /usr/sbin/sshd awk ss curl; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
for b in "$upstream_bin" "$client_bin" "$mg_bin"; do [ -x "$b" ] || die "$b missing: cmake --build $build"; done
[[ $users =~ ^[0-9]+$ ]] && [ "$users" -ge 1 ] || die "HERD_USERS must be a number"
# Each user holds a client socket and an SSH socket in moongate, and sshd two processes.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((2 * users + 100)) ] || die "ulimit -n $(ulimit -n) is too low for $users users"

bench_init
echo "bench: herd of $users users, build $build, temp dir $dir, $(nproc) cores"
echo "bench: load average $(cut -d' ' -f1-3 /proc/loadavg) before the run"
start_upstream
# OpenSSH's own default MaxStartups unless told otherwise: sshd starts refusing 30% of new
# unauthenticated connections at 10 and all at 100, which is what a stock sshd does to a herd.
maxstartups=${HERD_MAXSTARTUPS:-10:30:100}
start_sshd "$maxstartups"

# One policy for every run: the user is the X-User header, everyone routed to the one sshd,
# each request waiting up to 30 s for its connection (the default queue timeout).
cat >"$dir/herd.lua" <<LUA
local route = { host = "127.0.0.1", port = $ssh_port, ssh_user = "$ssh_user", key = "$dir/gateway_key",
                known_hosts = "$dir/known_hosts", target_host = "127.0.0.1", target_port = $up_port }
return {
  authenticate = function(req) return req.headers["x-user"] end,
  route = function(req, user) return route end,
}
LUA

# The stale sweep (CLEANUP_INTERVAL) trims idle connections and returns free pages; a short
# interval here lets the run see its effect without waiting the default 30 s.
sweep_s=5
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { printf "%s", $2 }'; }
stat_peak() { curl -s "http://127.0.0.1:$1/stats" | grep -o '"peak":[0-9]*' | cut -d: -f2; }
sshd_children() { descendants "$sshd_pid" | wc -l; }

# run_herd BOUND: one fresh moongate, the herd, its figures into R_<field>[BOUND].
declare -A R_served R_504 R_502 R_503 R_other R_none R_wall R_peak R_rss0 R_rss1 R_rss2 R_conns R_max
run_herd() {
    local bound=$1 port pid env_bound=() out tag=${1//\//-}
    port=$(free_port)
    if [ "$bound" != default ]; then
        [[ $bound =~ ^[0-9]+/[0-9]+$ ]] || die "HERD_BOUNDS: $bound is not G/S"
        env_bound=(MOONGATE_MAX_HANDSHAKES="${bound%/*}" MOONGATE_MAX_HANDSHAKES_PER_SERVER="${bound#*/}")
    fi
    env MOONGATE_LUA_DIR="$here/lua" MOONGATE_LOG_LEVEL=warn MOONGATE_MAX_CLIENTS=20000 \
        CLEANUP_INTERVAL=$((sweep_s * 1000)) QUEUE_TIMEOUT="$queue_timeout" \
        "${env_bound[@]}" "$mg_bin" -c "$dir/herd.lua" -l "127.0.0.1:$port" \
        >"$dir/mg-$tag.log" 2>&1 &
    pid=$!
    pids+=($pid)
    wait_port "$port" "$pid" || die "moongate did not start: $(tail -5 "$dir/mg-$tag.log")"
    sleep 0.5
    R_rss0[$bound]=$(rss "$pid")
    out=$(curl -s "http://127.0.0.1:$port/stats")
    R_max[$bound]="$(echo "$out" | grep -o '"max":[0-9]*' | cut -d: -f2)/$(echo "$out" | grep -o '"max_per_server":[0-9]*' | cut -d: -f2)"
    echo "bench: MOONGATE_MAX_HANDSHAKES/_PER_SERVER=${R_max[$bound]}: $users users at once"
    out=$("$client_bin" -p "$port" -n "$users" --path "$path" --user-header x-user \
          --user-prefix user --timeout-ms 90000 2>>"$dir/client.log") || true
    echo "$out" >"$dir/client-$tag.out"
    local k v
    while IFS='=' read -r k v; do
        case $k in
        status_200) R_served[$bound]=$v ;; status_504) R_504[$bound]=$v ;;
        status_502) R_502[$bound]=$v ;; status_503) R_503[$bound]=$v ;;
        status_other) R_other[$bound]=$v ;; no_response) R_none[$bound]=$v ;;
        wall_ms) R_wall[$bound]=$(calc "sprintf(\"%.1f\", $v / 1000)") ;;
        esac
    done <<<"$out"
    # The served users' tunnels stay open and idle (MAX_IDLE_TIME is 5 minutes).
    sleep 1
    R_rss1[$bound]=$(rss "$pid")
    R_conns[$bound]=$(ss -Htnp state established "( dport = :$ssh_port )" 2>/dev/null | grep -c "pid=$pid," || true)
    R_peak[$bound]=$(stat_peak "$port")
    # And once the cleanup sweep has passed over them: what an idle tunnel costs for good.
    sleep "$sweep_s"
    R_rss2[$bound]=$(rss "$pid")
    kill -TERM "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    stop_pid "$pid" 0
    # The next run starts once sshd has let go of this one's sessions.
    for _ in $(seq 200); do [ "$(sshd_children)" -eq 0 ] && break; sleep 0.05; done
}

for b in "${bounds[@]}"; do run_herd "$b"; done

base=${bounds[0]}
W1=30 W=12
cols() { printf "%-${W1}s" "$1"; shift; for v in "$@"; do printf " %${W}s" "$v"; done; echo; }
echo
echo "== herd: $users distinct users at once (GET $path), each needing a new SSH connection and waiting up to $queue_timeout ms, one loopback sshd (MaxStartups $maxstartups)"
hdr=("")
for b in "${bounds[@]}"; do
    if [ "${R_max[$b]:-}" = 0/0 ]; then hdr+=("no bound"); else hdr+=("bound ${R_max[$b]:-?}"); fi
done
cols "${hdr[@]}" "target"
row_of() {  # label array-name [target]
    local label=$1 name=$2 target=${3:-} vals=() b ref
    for b in "${bounds[@]}"; do ref="$name[$b]"; vals+=("${!ref:-fail}"); done
    cols "$label" "${vals[@]}" "$target"
}
row_of "served (200)" R_served "all $users"
row_of "timed out (504)" R_504
row_of "failed (502)" R_502
row_of "refused (503)" R_503
row_of "other status" R_other
row_of "no response" R_none
row_of "time to the last (s)" R_wall
row_of "handshakes at once, peak" R_peak
row_of "SSH connections kept" R_conns
row_of "RSS before (MB)" R_rss0
row_of "RSS, tunnels idle 1 s (MB)" R_rss1
row_of "RSS, after a sweep (MB)" R_rss2 "< 128 MB"
per_tunnel() {  # array-name: KB per idle tunnel over the idle process, per run
    local name=$1 b ref per=()
    for b in "${bounds[@]}"; do
        ref="$name[$b]"
        if num "${!ref:-}" && num "${R_conns[$b]:-}" && [ "${R_conns[$b]}" -gt 0 ]; then
            per+=("$(calc "sprintf(\"%.0f\", (${!ref} - ${R_rss0[$b]}) * 1024 / ${R_conns[$b]})")")
        else
            per+=(fail)
        fi
    done
    echo "${per[@]}"
}
read -r -a per <<<"$(per_tunnel R_rss1)"
cols "KB per idle tunnel, 1 s" "${per[@]}"
read -r -a per <<<"$(per_tunnel R_rss2)"
cols "KB per idle tunnel, swept" "${per[@]}"
echo "   (RSS: VmRSS from /proc, MB = 2^20 bytes, read 1 s after the last response and again after"
echo "    one stale sweep, CLEANUP_INTERVAL=${sweep_s}000 here; the tunnels open all along)"

echo
echo "== summary"
for b in "${bounds[@]:1}"; do
    s=${R_served[$b]:-0}
    res=$(verdict "$s" "$s == $users" MISS)
    echo "$res  bound ${R_max[$b]:-?}: ${s} of $users served in ${R_wall[$b]:-fail} s (504: ${R_504[$b]:-?}, 502: ${R_502[$b]:-?}, 503: ${R_503[$b]:-?}); no bound: ${R_served[$base]:-fail} served, $(ratio "$s" "${R_served[$base]:-}") as many (target: all served)"
    res=$(verdict "${R_rss2[$b]:-}" "${R_rss2[$b]:-0} < 128 && ${R_conns[$b]:-0} == $users" MISS)
    echo "$res  memory: ${R_rss2[$b]:-fail} MB with ${R_conns[$b]:-?} idle tunnels after a sweep, ${R_rss1[$b]:-fail} MB 1 s after the herd (target < 128 MB with all $users)"
done
exit 0
