#!/usr/bin/env bash
# Tollgate vs nginx, same machine, same upstream, same load tool. One run prints one table.
#
#   cargo build --release -j1 --bin tollgate --example ws_echo --example ws_hold
#   benches/load.sh
#
# 1. HTTP proxying: wrk -t1 -c50 -d10s --latency through each proxy (1 thread / 1 worker) to a
#    tiny nginx upstream; requests/s, p50, p99 and proxy CPU µs per request, median of 3 runs.
# 2. Idle WebSocket memory: N idle WebSocket connections through each proxy to an echo upstream;
#    proxy RSS before/after, KB per connection.
# See benches/README.md. Knobs (env): RUNS DURATION CONNS WS_N WS_HOLD WS_SOURCES LOAD_CORE
# PROXY_CORE TOLLGATE_BIN PHASES KEEP.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TOLLGATE_BIN:-$ROOT/target/release/tollgate}
EXAMPLES=${EXAMPLES_DIR:-$ROOT/target/release/examples}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
WS_N=${WS_N:-10000}
WS_HOLD=${WS_HOLD:-10}
WS_SOURCES=${WS_SOURCES:-127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4}
PHASES=${PHASES:-http,ws}    # which parts to run
KEEP=${KEEP:-0}              # 1: keep the temp dir (configs, logs, wrk output) and print its path
LOAD_CORE=${LOAD_CORE:-0}    # wrk, the upstreams, the WebSocket client
PROXY_CORE=${PROXY_CORE:-1}  # the proxy under test (one at a time under load)

die() { echo "load.sh: $*" >&2; exit 1; }
# cleanup (the EXIT trap), stop_wait, stop, free_port, wait_port, log, build_tollgate, cpu_ticks,
# children, kids_ticks, core_jiffies, busy_pct, foreign_pct, busy_redo, upstream_count,
# start_nginx, start_tollgate, nginx_conf, PROXY_LOCATION, median_col, sum_col, ratio
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------------------------------------
# Tools

missing=()
for t in nginx wrk taskset curl ss; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if ((${#missing[@]})); then
    die "missing: ${missing[*]} (apt-get install -y nginx-light wrk util-linux curl iproute2)"
fi
for f in "$BIN" "$EXAMPLES/ws_echo" "$EXAMPLES/ws_hold"; do
    [[ -x $f ]] || die "$f not built: cargo build --release -j1 --bin tollgate --example ws_echo --example ws_hold"
done
NGINX=$(command -v nginx)
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
((NCPU > PROXY_CORE && NCPU > LOAD_CORE)) || die "needs cores $LOAD_CORE and $PROXY_CORE (have $NCPU)"

# File descriptors: each proxied WebSocket costs the proxy two (client + upstream side).
ulimit -n 65535 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
WS_MAX=$(((NOFILE - 200) / 2))
WS_NOTE=""
# nginx starts dropping connections that have not sent a request yet (reusable) once fewer than
# 1/16 of worker_connections are free, so size it past 2N by that margin. It may exceed the fd
# limit: it only sizes nginx's connection table.
NGINX_WC=$((2 * (WS_N < WS_MAX ? WS_N : WS_MAX) * 16 / 15 + 1024))
if ((WS_N > WS_MAX)); then
    WS_NOTE="WS_N lowered from $WS_N to $WS_MAX: open files hard limit is $NOFILE (2 fds per proxied WebSocket)"
    WS_N=$WS_MAX
fi

ODD=() # odd things seen, printed under the table

# ---------------------------------------------------------------------------------------------
# Temp dir, processes, cleanup

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-load.XXXXXX")
PIDS=()
trap cleanup EXIT
trap 'exit 130' INT TERM
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# ---------------------------------------------------------------------------------------------
# Configs

tollgate_conf() { # name port upstream_port admin_port
    local dir=$TMP/$1
    mkdir -p "$dir"
    cat >"$dir/tollgate.yaml" <<EOF
listeners: [ { name: web, address: "127.0.0.1:$2" } ]
admin: { address: "127.0.0.1:$4" }
server: { threads: 1, pid_file: $dir/pid, upgrade_sock: $dir/sock${TOLLGATE_SERVER_EXTRA:-} }
access_log: { enabled: false }
upstreams: { app: { backends: [ { address: "127.0.0.1:$3" } ] } }
routes: [ { name: app, match: { path_prefix: / }, upstream: app, websocket: { idle_timeout: 1h } } ]
EOF
    echo "$dir/tollgate.yaml"
}

log "started $(date -u +%FT%TZ) on $(hostname), $NCPU cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------------------------
# 1. HTTP

if [[ $PHASES == *http* ]]; then
free_port UP_PORT
free_port TG_PORT
free_port NG_PORT
free_port TG_ADMIN

up_conf=$(nginx_conf upstream "
    server { listen 127.0.0.1:$UP_PORT backlog=4096; location / { return 200 \"ok\"; }
        location = /nginx_status { stub_status; } }")
ng_conf=$(nginx_conf nginx-proxy "
    upstream app { server 127.0.0.1:$UP_PORT; keepalive 128; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$NG_PORT backlog=4096;
$PROXY_LOCATION
    }")
tg_conf=$(tollgate_conf tollgate "$TG_PORT" "$UP_PORT" "$TG_ADMIN")

start_nginx upstream "$up_conf" "$LOAD_CORE" "$UP_PORT"; UP_PID=$STARTED
start_nginx nginx-proxy "$ng_conf" "$PROXY_CORE" "$NG_PORT"; NG_PID=$STARTED
start_tollgate tollgate "$tg_conf" "$PROXY_CORE" "$TG_PORT"; TG_PID=$STARTED

for port in "$UP_PORT" "$NG_PORT" "$TG_PORT"; do
    body=$(curl -s --max-time 5 "http://127.0.0.1:$port/") || die "no answer on $port"
    [[ $body == ok ]] || die "unexpected body on port $port: $body"
done

# wrk's latency in µs.
to_us() { awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") print n; else if (u == "ms") print n * 1000; else if (u == "s") print n * 1e6;
    else if (u == "m") print n * 6e7; else print "nan" }'; }

# run name port pids... -> appends "rps p50 p99 cpu_us_per_req" to $TMP/name.results
bench_http() {
    local name=$1 port=$2 run=$3
    shift 3
    local pids=("$@") c0 c1 out a0 a1
    a0=$(upstream_count accepts)
    c0=$(cpu_ticks "${pids[@]}")
    out=$(taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency --timeout 5s \
        "http://127.0.0.1:$port/")
    c1=$(cpu_ticks "${pids[@]}")
    a1=$(upstream_count accepts)
    echo "$out" >"$TMP/$name.wrk.$run"
    local rps p50 p99 reqs non2xx sockerr
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    sockerr=$(grep 'Socket errors' <<<"$out" || true)
    [[ -n $non2xx ]] && ODD+=("$name run $run: $non2xx non-2xx responses")
    [[ -n $sockerr ]] && ODD+=("$name run $run: ${sockerr# *}")
    ((c1 > c0)) || ODD+=("$name run $run: proxy CPU did not move (is wrk reaching the proxy?)")
    local cpu_us
    cpu_us=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v r="$reqs" 'BEGIN { printf "%.2f", t / hz * 1e6 / r }')
    local up_conns=$((a1 - a0 - 1)) # minus our own status request
    echo "$rps $p50 $p99 $cpu_us $up_conns" >>"$TMP/$name.results"
    log "$name run $run: $rps req/s, p50 ${p50}us, p99 ${p99}us, ${cpu_us} cpu-us/req ($reqs requests, $up_conns new upstream connections)"
}

# Warm both (connection pools, allocator, page cache), then interleave the measured runs so
# slow drift in background load hits both proxies alike.
taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$TG_PORT/" >/dev/null
taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$NG_PORT/" >/dev/null
mapfile -t NG_WORKERS < <(children "$NG_PID")
for ((r = 1; r <= RUNS; r++)); do
    bench_http tollgate "$TG_PORT" "$r" "$TG_PID"
    bench_http nginx "$NG_PORT" "$r" "$NG_PID" "${NG_WORKERS[@]}"
done
stop "$TG_PID"
stop "$NG_PID" TERM
stop "$UP_PID" TERM
fi

# ---------------------------------------------------------------------------------------------
# 2. WebSocket memory

if [[ $PHASES == *ws* ]]; then
free_port WS_UP_PORT
taskset -c "$LOAD_CORE" "$EXAMPLES/ws_echo" "127.0.0.1:$WS_UP_PORT" >"$TMP/ws_echo.log" 2>&1 &
WS_UP_PID=$!
PIDS+=("$WS_UP_PID")
wait_port "$WS_UP_PORT" ws_echo "$WS_UP_PID"

# name port rss_pid -> "opened before_kb after_kb kb_per_conn alive closed_kb"
bench_ws() {
    local name=$1 port=$2 rss_pid=$3 before after out ready result i
    sleep 1
    before=$(rss_kb "$rss_pid")
    out=$TMP/$name.ws_hold
    taskset -c "$LOAD_CORE" "$EXAMPLES/ws_hold" --connect "127.0.0.1:$port" --n "$WS_N" \
        --concurrency 200 --hold-secs "$WS_HOLD" --open-timeout-secs 90 --sources "$WS_SOURCES" \
        >"$out" 2>&1 &
    local hold_pid=$!
    PIDS+=("$hold_pid")
    for ((i = 0; i < 1000; i++)); do # open timeout 90 s + margin
        ready=$(grep '^READY' "$out" || true)
        [[ -n $ready ]] && break
        kill -0 "$hold_pid" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $ready ]] || die "ws_hold through $name never got ready: $(tail -5 "$out")"
    sleep 2 # let the last handshakes' buffers settle
    after=$(rss_kb "$rss_pid")
    for ((i = 0; i < 10 * (WS_HOLD + 60); i++)); do
        kill -0 "$hold_pid" 2>/dev/null || break
        sleep 0.1
    done
    stop "$hold_pid" KILL
    sleep 2
    local closed
    closed=$(rss_kb "$rss_pid") # after every connection closed: what the proxy gives back
    result=$(grep '^RESULT' "$out" || true)
    [[ -n $result ]] || die "ws_hold through $name gave no result: $(tail -5 "$out")"
    log "$name: $ready; $result; RSS ${before} -> ${after} KB"
    grep '^ERROR' "$out" | sed "s/^/# $name ws_hold: /" >&2 || true
    local opened alive
    opened=$(sed -E 's/.* opened=([0-9]+).*/\1/' <<<"$result")
    alive=$(sed -E 's/.* alive_after_hold=([0-9]+).*/\1/' <<<"$result")
    ((opened == WS_N)) || ODD+=("$name WebSocket: only $opened of $WS_N opened ($result)")
    ((alive == opened)) || ODD+=("$name WebSocket: $alive of $opened alive after ${WS_HOLD}s hold ($result)")
    local per
    per=$(awk -v a="$after" -v b="$before" -v n="$opened" 'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "nan" }')
    echo "$opened $before $after $per $alive $closed" >"$TMP/$name.ws"
}

free_port WS_TG_PORT
free_port WS_NG_PORT
free_port WS_TG_ADMIN
ws_tg_conf=$(tollgate_conf tollgate-ws "$WS_TG_PORT" "$WS_UP_PORT" "$WS_TG_ADMIN")
ws_ng_conf=$(nginx_conf nginx-ws "
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream ws { server 127.0.0.1:$WS_UP_PORT; }
    server {
        listen 127.0.0.1:$WS_NG_PORT backlog=4096;
        location / {
            proxy_pass http://ws;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
    }")

start_tollgate tollgate-ws "$ws_tg_conf" "$PROXY_CORE" "$WS_TG_PORT"; TG_PID=$STARTED
bench_ws tollgate "$WS_TG_PORT" "$TG_PID"
stop "$TG_PID"
start_nginx nginx-ws "$ws_ng_conf" "$PROXY_CORE" "$WS_NG_PORT"; NG_PID=$STARTED
mapfile -t NG_WORKERS < <(children "$NG_PID")
((${#NG_WORKERS[@]} == 1)) || die "expected one nginx worker, got: ${NG_WORKERS[*]}"
bench_ws nginx "$WS_NG_PORT" "${NG_WORKERS[0]}"
stop "$NG_PID" TERM
stop "$WS_UP_PID" TERM
fi

# ---------------------------------------------------------------------------------------------
# Table

echo
echo "Tollgate vs nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') — $(date -u +%F), $NCPU cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), load avg at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Pinning: proxy under test on core $PROXY_CORE (tollgate threads: 1; nginx worker_processes 1);"
echo "         wrk -t1 -c$CONNS -d${DURATION}s, the nginx 'return 200' upstream, ws_echo and ws_hold on core $LOAD_CORE."
echo "CPU/req: utime+stime delta of the proxy (/proc/PID/stat; nginx master+worker) over the wrk run / requests."
if [[ $PHASES == *http* ]]; then
for n in tollgate nginx; do
    for c in 1 2 3 4 5; do printf -v "M_${n}_$c" '%s' "$(median_col "$TMP/$n.results" "$c")"; done
done
echo
echo "HTTP proxy, median of $RUNS runs   req/s      p50 µs    p99 µs    CPU µs/req   new upstream conns/run"
printf '  %-30s %10.0f %9.0f %9.0f %10.2f %12s\n' tollgate "$M_tollgate_1" "$M_tollgate_2" "$M_tollgate_3" "$M_tollgate_4" "$M_tollgate_5"
printf '  %-30s %10.0f %9.0f %9.0f %10.2f %12s\n' nginx "$M_nginx_1" "$M_nginx_2" "$M_nginx_3" "$M_nginx_4" "$M_nginx_5"
printf '  %-30s %10s %9s %9s %10s\n' "tollgate/nginx" "$(ratio "$M_tollgate_1" "$M_nginx_1")" \
    "$(ratio "$M_tollgate_2" "$M_nginx_2")" "$(ratio "$M_tollgate_3" "$M_nginx_3")" "$(ratio "$M_tollgate_4" "$M_nginx_4")"
fi
if [[ $PHASES == *ws* ]]; then
read -r TG_WS_OPEN TG_WS_B TG_WS_A TG_WS_KB TG_WS_ALIVE TG_WS_C <"$TMP/tollgate.ws"
read -r NG_WS_OPEN NG_WS_B NG_WS_A NG_WS_KB NG_WS_ALIVE NG_WS_C <"$TMP/nginx.ws"
echo
echo "Idle WebSockets (N=$WS_N, ${WS_HOLD}s hold)   opened   alive   RSS KB before → open    KB/conn   RSS KB after close"
printf '  %-30s %8s %7s %10s → %-9s %8s %12s\n' tollgate "$TG_WS_OPEN" "$TG_WS_ALIVE" "$TG_WS_B" "$TG_WS_A" "$TG_WS_KB" "$TG_WS_C"
printf '  %-30s %8s %7s %10s → %-9s %8s %12s\n' "nginx (worker)" "$NG_WS_OPEN" "$NG_WS_ALIVE" "$NG_WS_B" "$NG_WS_A" "$NG_WS_KB" "$NG_WS_C"
printf '  %-30s %48s\n' "tollgate/nginx" "$(ratio "$TG_WS_KB" "$NG_WS_KB")"
if [[ -n $WS_NOTE ]]; then echo "Note: $WS_NOTE"; fi
fi
if ((${#ODD[@]})); then
    echo "Odd:"
    printf '  %s\n' "${ODD[@]}"
fi
