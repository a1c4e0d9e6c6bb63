#!/usr/bin/env bash
# Tollgate vs nginx terminating TLS, same machine, same certificate, same upstream, same load
# tool. One run prints one table.
#
#   cargo build --release --bin tollgate      # the script builds it if it is missing
#   benches/tls.sh
#
# Both proxies listen on 127.0.0.1 with one ECDSA P-256 certificate made here with openssl,
# offer h2 and http/1.1 by ALPN, run 1 thread / 1 worker and proxy over keep-alive HTTP/1.1 to
# one tiny nginx upstream. h2load (nghttp2-client) drives each proxy in turn:
#   h2       h2 keep-alive:            h2load -n H2_N -c H2_C -m H2_M           req/s, CPU µs/req
#   full     full handshakes:          h2load -n HS_N -c HS_N (1 request/conn)  conn/s, CPU µs/conn
#   resumed  resumed handshakes:       h2load --h1 -n RS_N -c RS_C, Connection: close
#   h1       HTTP/1.1 keep-alive:      h2load --h1 -n H1_N -c H1_C
# Median of RUNS runs, tollgate and nginx alternating. See benches/README.md. Knobs (env): RUNS
# H2_N H2_C H2_M HS_N RS_N RS_C H1_N H1_C PHASES LOAD_CORE PROXY_CORE TOLLGATE_BIN
# NGINX_KEEPALIVE RUN_TIMEOUT MAX_SECONDS FOREIGN_MAX REDOS KEEP.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TOLLGATE_BIN:-$ROOT/target/release/tollgate}
RUNS=${RUNS:-3}
H2_N=${H2_N:-50000}          # h2 keep-alive: requests per run
H2_C=${H2_C:-10}             #   connections
H2_M=${H2_M:-10}             #   concurrent streams per connection
HS_N=${HS_N:-2000}           # full handshakes per run: HS_N clients at once, one request each
RS_N=${RS_N:-5000}           # resumed: connections (= requests) per run
RS_C=${RS_C:-50}             #   at a time
H1_N=${H1_N:-50000}          # HTTP/1.1 keep-alive: requests per run
H1_C=${H1_C:-50}             #   connections
PHASES=${PHASES:-h2,full,resumed,h1}
KEEP=${KEEP:-0}              # 1: keep the temp dir (certs, configs, logs, h2load output)
LOAD_CORE=${LOAD_CORE:-0}    # h2load and the upstream
PROXY_CORE=${PROXY_CORE:-1}  # the proxy under test (one at a time under load)
NGINX_KEEPALIVE=${NGINX_KEEPALIVE:-128} # nginx's idle upstream connections (keepalive N)
RUN_TIMEOUT=${RUN_TIMEOUT:-60}   # seconds, one h2load run
MAX_SECONDS=${MAX_SECONDS:-600}  # the whole script
FOREIGN_MAX=${FOREIGN_MAX:-10}   # % of a core other processes may take during a run before it is redone
REDOS=${REDOS:-6}                # runs redone at most, per script
REDOS_MAX=$REDOS

die() { echo "tls.sh: $*" >&2; exit 1; }
# cleanup (the EXIT trap), stop_wait, stop, free_port, wait_port, log, build_tollgate, cpu_ticks,
# children, kids_ticks, core_jiffies, busy_pct, foreign_pct, busy_redo, upstream_count,
# start_nginx, start_tollgate, nginx_conf, PROXY_LOCATION, median_col, sum_col, ratio
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------------------------------------
# Tools

missing=()
for t in nginx h2load openssl taskset curl ss timeout; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if ((${#missing[@]})); then
    die "missing: ${missing[*]} (apt-get install -y nginx-light nghttp2-client openssl util-linux curl iproute2 coreutils)"
fi
ODD=() # odd things seen, printed under the table
build_tollgate
NGINX=$(command -v nginx)
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
((NCPU > PROXY_CORE && NCPU > LOAD_CORE)) || die "needs cores $LOAD_CORE and $PROXY_CORE (have $NCPU)"
ulimit -n 65535 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
# The full-handshake phase holds HS_N client connections at once: h2load needs HS_N fds, the
# proxy up to 2 per connection. The listen backlog (somaxconn) must hold them all too, or
# dropped SYNs/ACKs turn into 1 s retransmits that the handshake rate would include.
SOMAXCONN=$(cat /proc/sys/net/core/somaxconn)
((HS_N + 200 < NOFILE / 2)) || die "HS_N=$HS_N needs more than half the open-files limit ($NOFILE)"
((HS_N <= SOMAXCONN)) || die "HS_N=$HS_N exceeds net.core.somaxconn ($SOMAXCONN): lower HS_N"
NGINX_WC=$((2 * HS_N + 1024))

# ---------------------------------------------------------------------------------------------
# Temp dir, processes, cleanup

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-tls.XXXXXX")
PIDS=()
trap cleanup EXIT
trap 'exit 130' INT TERM

log "started $(date -u +%FT%TZ) on $(hostname), $NCPU cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------------------------
# Certificate: ECDSA P-256, self-signed, for localhost and 127.0.0.1 (h2load sends no SNI for
# an IP address; both proxies then serve their only/default certificate).

CERT=$TMP/cert.pem
KEY=$TMP/key.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$KEY" \
    -out "$CERT" -days 365 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    >"$TMP/openssl.log" 2>&1 || die "openssl req failed: $(tail -3 "$TMP/openssl.log")"

# ---------------------------------------------------------------------------------------------
# Configs

tollgate_conf() { # name port upstream_port admin_port
    local dir=$TMP/$1
    mkdir -p "$dir"
    cat >"$dir/tollgate.yaml" <<EOF
listeners:
  - name: tls
    address: "127.0.0.1:$2"
    tls:
      certificates:
        - { cert: $CERT, key: $KEY }
admin: { address: "127.0.0.1:$4" }
server: { threads: 1, pid_file: $dir/pid, upgrade_sock: $dir/sock }
access_log: { enabled: false }
upstreams: { app: { backends: [ { address: "127.0.0.1:$3" } ] } }
routes: [ { name: app, match: { path_prefix: / }, upstream: app } ]
EOF
    echo "$dir/tollgate.yaml"
}

free_port UP_PORT
free_port TG_PORT
free_port TG_ADMIN
free_port NG_PORT
free_port NG_STATUS

up_conf=$(nginx_conf upstream "
    server { listen 127.0.0.1:$UP_PORT backlog=4096; location / { return 200 \"ok\"; }
        location = /nginx_status { stub_status; } }")
ng_conf=$(nginx_conf nginx-proxy "
    upstream app { server 127.0.0.1:$UP_PORT; keepalive $NGINX_KEEPALIVE; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$NG_PORT ssl http2 backlog=4096;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        ssl_protocols TLSv1.2 TLSv1.3;
$PROXY_LOCATION
    }
    # Connections accepted (stub_status), to count the handshakes of a run; plain HTTP.
    server { listen 127.0.0.1:$NG_STATUS; location / { stub_status; } }")
tg_conf=$(tollgate_conf tollgate "$TG_PORT" "$UP_PORT" "$TG_ADMIN")

start_nginx upstream "$up_conf" "$LOAD_CORE" "$UP_PORT"; UP_PID=$STARTED
mapfile -t UP_PIDS < <(children "$UP_PID")
UP_PIDS+=("$UP_PID")
start_nginx nginx-proxy "$ng_conf" "$PROXY_CORE" "$NG_PORT"; NG_PID=$STARTED
start_tollgate tollgate "$tg_conf" "$PROXY_CORE" "$TG_PORT"; TG_PID=$STARTED
mapfile -t NG_WORKERS < <(children "$NG_PID")
((${#NG_WORKERS[@]} == 1)) || die "expected one nginx worker, got: ${NG_WORKERS[*]}"

for name in tollgate nginx-proxy; do
    if [[ $name == tollgate ]]; then port=$TG_PORT; logf=$TMP/tollgate.log; else port=$NG_PORT; logf=$TMP/nginx-proxy/error.log; fi
    for v in 2 1.1; do
        got=$(curl -sk "--http$v" --max-time 5 -o "$TMP/body" -w '%{http_code} %{http_version}' \
            "https://127.0.0.1:$port/") || die "$name: no TLS answer on $port (curl --http$v); log: $(tail -5 "$logf")"
        [[ $got == "200 ${v%.1}"* && $(cat "$TMP/body") == ok ]] ||
            die "$name on $port, curl --http$v: got '$got', body '$(head -c 200 "$TMP/body")'; log: $(tail -5 "$logf")"
    done
done

# Session resumption check (python3 ssl, if present): connect, get the TLS 1.3 ticket with the
# response, reconnect twice with it. Says whether the `resumed` phase resumes on each proxy.
resume_check() { # port
    command -v python3 >/dev/null || { echo "no python3"; return; }
    timeout 20 python3 - "$1" <<'EOF' 2>&1 | tail -1
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
sess, out = None, []
for _ in range(3):
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=sess) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
            out.append("reused" if s.session_reused else "full")
            sess = s.session
print(" ".join(out))
EOF
}
RESUME_TG=$(resume_check "$TG_PORT")
RESUME_NG=$(resume_check "$NG_PORT")
log "resumption check (3 connections, ticket of the previous one): tollgate: $RESUME_TG; nginx: $RESUME_NG"
[[ $RESUME_TG == "full reused reused" ]] || ODD+=("tollgate resumption check: $RESUME_TG (expected: full reused reused)")
[[ $RESUME_NG == "full reused reused" ]] || ODD+=("nginx resumption check: $RESUME_NG (expected: full reused reused)")

# Connections the proxy has taken so far, "ok failed timeout": tollgate's TLS handshakes
# (/metrics); nginx's accepted connections (stub_status; each read counts its own connection,
# so a run's delta is one more than the run's connections).
tg_metric() { # result
    curl -s --max-time 5 "http://127.0.0.1:$TG_ADMIN/metrics" |
        awk -v r="$1" '$1 == "tollgate_tls_handshakes_total{result=\"" r "\"}" {print $2; f = 1} END {if (!f) print 0}'
}
conns_of() { # name
    if [[ $1 == tollgate ]]; then
        echo "$(tg_metric ok) $(tg_metric failed) $(tg_metric timeout)"
    else
        echo "$(curl -s --max-time 5 "http://127.0.0.1:$NG_STATUS/" | awk 'NR == 3 {print $1}') 0 0"
    fi
}

# ---------------------------------------------------------------------------------------------
# Runs

# h2load arguments, and what one unit is, per phase.
phase_args() {
    case $1 in
        h2) ARGS=(-n "$H2_N" -c "$H2_C" -m "$H2_M") ;;
        full) ARGS=(-n "$HS_N" -c "$HS_N" -m 1) ;;
        resumed) ARGS=(--h1 -n "$RS_N" -c "$RS_C" -m 1 -H "Connection: close") ;;
        h1) ARGS=(--h1 -n "$H1_N" -c "$H1_C" -m 1) ;;
        *) die "unknown phase $1" ;;
    esac
}
expected_conns() {
    case $1 in h2) echo "$H2_C" ;; full) echo "$HS_N" ;; resumed) echo "$RS_N" ;; h1) echo "$H1_C" ;; esac
}

# phase name run -> appends "rate cpu_us_per_req errors conns proxy_core_busy load_core_busy
# up_conns foreign" to $TMP/phase.name.results. A run during which something else took more
# than FOREIGN_MAX % of a core (another build or test on the machine) is done again, up to
# REDOS times per script.
bench() {
    local phase=$1 name=$2 run=$3
    while :; do
        bench_once "$phase" "$name" "$run"
        busy_redo "$phase $name run $run" 10 || break
    done
    [[ -z $BUSY_KEPT ]] || ODD+=("$phase $name run $run: other processes took ${FOREIGN}% of a core during it (no redos left)")
    echo "$RESULT" >>"$TMP/$phase.$name.results"
}

bench_once() {
    local phase=$1 name=$2 run=$3 port pids
    if [[ $name == tollgate ]]; then port=$TG_PORT; pids=("$TG_PID"); else port=$NG_PORT; pids=("$NG_PID" "${NG_WORKERS[@]}"); fi
    ((SECONDS < MAX_SECONDS)) || die "over MAX_SECONDS=$MAX_SECONDS before $phase $name run $run"
    phase_args "$phase"
    local k0 k1 c0 c1 u0 u1 up0 up1 kid0 kid1 pc0 lc0 pc1 lc1 rc=0 f="$TMP/$phase.$name.h2load.$run"
    u0=$(upstream_count accepts)
    read -r -a k0 <<<"$(conns_of "$name")"
    kid0=$(kids_ticks); up0=$(cpu_ticks "${UP_PIDS[@]}"); c0=$(cpu_ticks "${pids[@]}")
    pc0=$(core_jiffies "$PROXY_CORE"); lc0=$(core_jiffies "$LOAD_CORE")
    taskset -c "$LOAD_CORE" timeout -k 5 "$RUN_TIMEOUT" h2load "${ARGS[@]}" "https://127.0.0.1:$port/" >"$f" 2>&1 || rc=$?
    pc1=$(core_jiffies "$PROXY_CORE"); lc1=$(core_jiffies "$LOAD_CORE")
    c1=$(cpu_ticks "${pids[@]}"); up1=$(cpu_ticks "${UP_PIDS[@]}"); kid1=$(kids_ticks)
    read -r -a k1 <<<"$(conns_of "$name")"
    u1=$(upstream_count accepts)
    if ((rc != 0)) || ! grep -q '^finished in' "$f"; then
        echo "--- h2load ${ARGS[*]} against $name (rc $rc):" >&2; tail -20 "$f" >&2
        echo "--- $name log tail:" >&2; tail -20 "$TMP/$name.log" "$TMP/$name/error.log" 2>/dev/null >&2 || true
        KEEP=1
        die "$phase $name run $run: h2load failed (rc $rc); temp dir kept"
    fi
    local rate total ok2xx errs conns hsfail
    rate=$(awk '/^finished in/ {print $4}' "$f")
    total=$(awk '/^requests:/ {print $2}' "$f")
    ok2xx=$(awk '/^status codes:/ {print $3}' "$f")
    errs=$((total - ok2xx))
    conns=$((k1[0] - k0[0]))
    [[ $name == tollgate ]] || conns=$((conns - 1)) # the second status read
    hsfail=$((k1[1] - k0[1] + k1[2] - k0[2]))
    ((errs == 0)) || ODD+=("$phase $name run $run: $errs of $total requests not 2xx: $(grep -E '^(requests|status codes):' "$f" | tr '\n' ' ')")
    ((hsfail == 0)) || ODD+=("$phase $name run $run: $hsfail TLS handshakes failed or timed out (tollgate_tls_handshakes_total)")
    local want
    want=$(expected_conns "$phase")
    ((conns == want)) || ODD+=("$phase $name run $run: $conns connections, expected $want")
    ((c1 > c0)) || ODD+=("$phase $name run $run: proxy CPU did not move (is h2load reaching the proxy?)")
    local cpu_us
    cpu_us=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v r="$total" 'BEGIN { printf "%.2f", t / hz * 1e6 / r }')
    # How busy each core was, and what of both cores' user+system time was none of ours (proxy,
    # upstream, h2load, curl), in % of one core.
    local pbusy lbusy
    pbusy=$(busy_pct "$pc0" "$pc1"); lbusy=$(busy_pct "$lc0" "$lc1")
    FOREIGN=$(foreign_pct "$pc0" "$pc1" "$lc0" "$lc1" $((c1 - c0 + up1 - up0 + kid1 - kid0)))
    local up_conns=$((u1 - u0 - 1)) # minus our own status request
    RESULT="$rate $cpu_us $errs $conns $pbusy $lbusy $up_conns $FOREIGN"
    # What was negotiated, for the table (the same for every run of a phase).
    awk -F': ' '/^TLS Protocol:/ {p = $2} /^Cipher:/ {c = $2} /^Server Temp Key:/ {k = $2}
        /^Application protocol:/ {a = $2} END {print p ", " c ", " k ", " a}' "$f" >"$TMP/$phase.$name.tls"
    log "$phase $name run $run: $rate req/s, ${cpu_us} cpu-us/req, $errs errors ($total requests, $conns connections, $up_conns new upstream connections; cores busy: proxy ${pbusy}%, load ${lbusy}%, others ${FOREIGN}%; $(cat "$TMP/$phase.$name.tls"))"
}

# Warm both (upstream pools, allocator, page cache, session ticket keys).
for port in "$TG_PORT" "$NG_PORT"; do
    taskset -c "$LOAD_CORE" timeout -k 5 "$RUN_TIMEOUT" h2load -n 10000 -c "$H2_C" -m "$H2_M" "https://127.0.0.1:$port/" >/dev/null 2>&1 ||
        die "warm-up against port $port failed"
    taskset -c "$LOAD_CORE" timeout -k 5 "$RUN_TIMEOUT" h2load --h1 -n 1000 -c "$RS_C" -H "Connection: close" "https://127.0.0.1:$port/" >/dev/null 2>&1 ||
        die "warm-up (h1) against port $port failed"
done

IFS=, read -r -a PHASE_LIST <<<"$PHASES"
for phase in "${PHASE_LIST[@]}"; do
    phase_args "$phase" # validates the name
    # Interleave so slow drift in background load hits both proxies alike.
    for ((r = 1; r <= RUNS; r++)); do
        bench "$phase" tollgate "$r"
        bench "$phase" nginx "$r"
    done
done

if ! kill -0 "$TG_PID" 2>/dev/null; then ODD+=("tollgate exited during the runs: $(tail -5 "$TMP/tollgate.log")"); fi
RSS_TG=$(awk '/^VmRSS:/ {print $2}' "/proc/$TG_PID/status" 2>/dev/null || echo "?")
stop "$TG_PID"
stop "$NG_PID" TERM
stop "$UP_PID" TERM
if grep -qE '\[(error|crit|alert|emerg)\]' "$TMP/nginx-proxy/error.log" 2>/dev/null; then
    ODD+=("nginx error log: $(grep -cE '\[(error|crit|alert|emerg)\]' "$TMP/nginx-proxy/error.log") lines, last: $(grep -E '\[(error|crit|alert|emerg)\]' "$TMP/nginx-proxy/error.log" | tail -1 | cut -c1-300)")
fi
if grep -qE ' (ERROR|WARN) |panicked' "$TMP/tollgate.log"; then
    ODD+=("tollgate log: $(grep -cE ' (ERROR|WARN) |panicked' "$TMP/tollgate.log") ERROR/WARN lines, last: $(grep -E ' (ERROR|WARN) |panicked' "$TMP/tollgate.log" | tail -1 | cut -c1-300)")
fi

# ---------------------------------------------------------------------------------------------
# Table

med() { median_col "$TMP/$1.results" "$2"; } # phase.name column

echo
echo "Tollgate vs nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') over TLS — $(date -u +%F), $NCPU cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), load avg at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "tollgate: $BIN (built $(date -u -r "$BIN" +%FT%TZ))"
echo "Pinning: proxy under test on core $PROXY_CORE (tollgate threads: 1; nginx worker_processes 1);"
echo "  $(h2load --version | head -1) (1 thread) and the nginx 'return 200' upstream on core $LOAD_CORE."
echo "Certificate: ECDSA P-256, the same file for both. CPU: utime+stime delta of the proxy"
echo "  (/proc/PID/stat; nginx master+worker) over the h2load run / requests (= connections in the"
echo "  handshake rows). errors: requests without a 2xx, summed over the runs. up conns: new"
echo "  connections the upstream accepted per run. core % p/l/others: how busy the proxy's core and"
echo "  the load core were, and how much user+system time of both went to other processes (% of"
echo "  one core; a run with others > $FOREIGN_MAX % is done again, up to $REDOS_MAX times a script)."
echo "Resumption check (3 connections, each with the previous one's ticket): tollgate: $RESUME_TG;"
echo "  nginx: $RESUME_NG. h2load's clients in the full row never resume (one connection each)."

for phase in "${PHASE_LIST[@]}"; do
    case $phase in
        h2) title="h2 keep-alive (h2load -n$H2_N -c$H2_C -m$H2_M)"; unit="req/s"; cu="CPU µs/req" ;;
        full) title="Full handshakes, h2, 1 request each (h2load -n$HS_N -c$HS_N)"; unit="conn/s"; cu="CPU µs/conn" ;;
        resumed) title="Resumed handshakes, HTTP/1.1 Connection: close (h2load --h1 -n$RS_N -c$RS_C)"; unit="conn/s"; cu="CPU µs/conn" ;;
        h1) title="HTTP/1.1 keep-alive (h2load --h1 -n$H1_N -c$H1_C)"; unit="req/s"; cu="CPU µs/req" ;;
    esac
    echo
    echo "$title, median of $RUNS runs"
    printf '  %-16s %10s %12s %7s %10s %9s %16s   %s\n' "" "$unit" "$cu" errors "conns/run" "up conns" "core % p/l/others" "negotiated"
    for n in tollgate nginx; do
        printf '  %-16s %10.0f %12.2f %7s %10s %9s %16s   %s\n' "$n" "$(med "$phase.$n" 1)" "$(med "$phase.$n" 2)" \
            "$(sum_col "$TMP/$phase.$n.results" 3)" "$(med "$phase.$n" 4)" "$(med "$phase.$n" 7)" \
            "$(med "$phase.$n" 5)/$(med "$phase.$n" 6)/$(med "$phase.$n" 8)" "$(cat "$TMP/$phase.$n.tls")"
    done
    printf '  %-16s %10s %12s\n' "tollgate/nginx" "$(ratio "$(med "$phase.tollgate" 1)" "$(med "$phase.nginx" 1)")" \
        "$(ratio "$(med "$phase.tollgate" 2)" "$(med "$phase.nginx" 2)")"
    # A proxy core that was not saturated means h2load (or the upstream) was the limit: then
    # the rate says little about the proxy, 1 s / CPU per unit says what one core could do.
    for n in tollgate nginx; do
        b=$(med "$phase.$n" 5)
        if [[ $b != "?" ]] && ((${b%.*} < 90)); then
            echo "  ($n's core was ${b}% busy: the load side was the limit; one core at that CPU cost: $(awk -v c="$(med "$phase.$n" 2)" 'BEGIN { printf "%.0f", 1e6 / c }') $unit)"
        fi
    done
    if [[ $(cat "$TMP/$phase.tollgate.tls") != "$(cat "$TMP/$phase.nginx.tls")" ]]; then
        ODD+=("$phase: tollgate and nginx negotiated different parameters")
    fi
done
echo
echo "tollgate RSS at the end: $RSS_TG KB; whole script: ${SECONDS}s"
if ((${#ODD[@]})); then
    echo "Odd:"
    printf '  %s\n' "${ODD[@]}"
fi
