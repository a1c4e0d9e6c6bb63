#!/usr/bin/env bash
# What the WAF costs: tollgate with its native SecLang engine running OWASP CRS 3.3.4, against
# nginx with ModSecurity 3 running the same CRS files. Same machine, same upstream, same load
# tool, same requests. One run prints one table.
#
#   cargo build --release --bin tollgate      # the script builds it if it is missing
#   benches/waf.sh                            # 4-8 min; table on stdout, progress on stderr
#
# Three requests (bodies in benches/waf/):
#   get        GET /search?q=shoes&page=2&sort=price
#   json       POST /api/orders, application/json, 4.2 KB (benches/waf/order.json)
#   multipart  POST /upload, multipart/form-data, ~60 KB: three text fields and a text file part
#              (benches/waf/trail-notes.txt); below the 64 KiB tollgate inspects
# through six proxies, each 1 thread / 1 worker on PROXY_CORE, to one nginx `return 200`
# upstream on LOAD_CORE:
#   tg-off tg-pl1 tg-pl2   tollgate, waf mode off / block at paranoia 1 / block at paranoia 2
#   ng ng-pl1 ng-pl2       nginx proxy, no ModSecurity / ModSecurity + CRS at PL1 / at PL2
# Each (proxy, request) is first checked with curl (must be 200 with the upstream's body; a 403
# there means the WAF blocks a benign request, and the cell is not timed), then warmed up and
# sized: a run is a fixed number of requests (h2load --h1, one thread, CONNS connections, exact
# count) making about RUN_CPU seconds of the proxy's CPU. CPU µs/request = utime+stime delta of
# the proxy (/proc/PID/stat; nginx master+worker) over the run / requests; median of RUNS runs,
# every cell's runs interleaved. WAF cost = median(PL) - median(off / plain nginx).
# See benches/README.md. Knobs (env): RUNS CONNS RUN_CPU MIN_N MAX_N CONFIGS REQUESTS LOAD_CORE
# PROXY_CORE TOLLGATE_BIN MODSEC_MODULE TARGET_US RUN_TIMEOUT MAX_SECONDS FOREIGN_MAX REDOS
# QUIET_WAIT KEEP.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TOLLGATE_BIN:-$ROOT/target/release/tollgate}
DATA=$ROOT/benches/waf
RUNS=${RUNS:-3}
CONNS=${CONNS:-8}            # h2load connections (requests in flight)
RUN_CPU=${RUN_CPU:-3}        # seconds of proxy CPU a measured run is sized to
MIN_N=${MIN_N:-200}          # requests per run, at least / at most
MAX_N=${MAX_N:-200000}
CONFIGS=${CONFIGS:-tg-off,tg-pl1,tg-pl2,ng,ng-pl1,ng-pl2}
REQUESTS=${REQUESTS:-get,json,multipart}
KEEP=${KEEP:-0}              # 1: keep the temp dir (configs, logs, h2load output)
LOAD_CORE=${LOAD_CORE:-0}    # h2load, curl and the upstream
PROXY_CORE=${PROXY_CORE:-1}  # the proxies (one at a time under load)
TARGET_US=${TARGET_US:-30}   # the target: tollgate PL1 adds at most this to the GET
RUN_TIMEOUT=${RUN_TIMEOUT:-60}   # seconds, one h2load run
MAX_SECONDS=${MAX_SECONDS:-900}  # the whole script
FOREIGN_MAX=${FOREIGN_MAX:-10}   # % of a core other processes may take during a run before it is redone
REDOS=${REDOS:-10}               # runs redone at most, per script
QUIET_WAIT=${QUIET_WAIT:-150}    # seconds the script may wait in all, before runs, for other processes to calm down
REDOS_MAX=$REDOS
CRS_SETUP=/etc/modsecurity/crs/crs-setup.conf
CRS_RULES=/usr/share/modsecurity-crs/rules

die() { echo "waf.sh: $*" >&2; exit 1; }
# cleanup (the EXIT trap), stop_wait, stop, free_port, wait_port, log, build_tollgate, cpu_ticks,
# children, kids_ticks, core_jiffies, busy_pct, foreign_pct, busy_redo, upstream_count,
# start_nginx, start_tollgate, nginx_conf, PROXY_LOCATION, median_col, sum_col, ratio
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------------------------------------
# Tools

missing=()
for t in nginx h2load taskset curl ss timeout; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if ((${#missing[@]})); then
    die "missing: ${missing[*]} (apt-get install -y nginx-light nghttp2-client util-linux curl iproute2 coreutils)"
fi
NGINX=$(command -v nginx)
MODULES=$("$NGINX" -V 2>&1 | tr ' ' '\n' | sed -n 's/^--modules-path=//p')
MODSEC_MODULE=${MODSEC_MODULE:-${MODULES:-/usr/lib/nginx/modules}/ngx_http_modsecurity_module.so}
IFS=, read -r -a CONFIG_LIST <<<"$CONFIGS"
IFS=, read -r -a REQUEST_LIST <<<"$REQUESTS"
for c in "${CONFIG_LIST[@]}"; do
    case $c in tg-off | tg-pl1 | tg-pl2 | ng | ng-pl1 | ng-pl2) ;; *) die "unknown config $c" ;; esac
done
for q in "${REQUEST_LIST[@]}"; do
    case $q in get | json | multipart) ;; *) die "unknown request $q" ;; esac
done
has() { [[ ",$CONFIGS," == *",$1,"* ]]; }
if has ng-pl1 || has ng-pl2; then
    [[ -f $MODSEC_MODULE ]] || die "no $MODSEC_MODULE (apt-get install -y libnginx-mod-http-modsecurity)"
fi
if has ng-pl1 || has ng-pl2 || has tg-pl1 || has tg-pl2; then
    [[ -f $CRS_SETUP && -d $CRS_RULES ]] || die "no CRS in $CRS_SETUP / $CRS_RULES (apt-get install -y modsecurity-crs)"
fi
ODD=() # odd things seen, printed under the table
if has tg-off || has tg-pl1 || has tg-pl2; then build_tollgate; fi
BIN_BUILT=$( [[ -x $BIN ]] && date -u -r "$BIN" +%FT%TZ || echo "?") # before the runs: a build may replace it meanwhile
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
((NCPU > PROXY_CORE && NCPU > LOAD_CORE)) || die "needs cores $LOAD_CORE and $PROXY_CORE (have $NCPU)"
((PROXY_CORE != LOAD_CORE)) || die "PROXY_CORE and LOAD_CORE must differ"
NOFILE=$(ulimit -n)
NGINX_WC=1024

# ---------------------------------------------------------------------------------------------
# Temp dir, processes, cleanup

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-waf.XXXXXX")
PIDS=()
trap cleanup EXIT
trap 'exit 130' INT TERM

log "started $(date -u +%FT%TZ) on $(hostname), $NCPU cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# The binary under test, frozen: a build next door may replace target/release/tollgate while
# the script runs (the diag instances start later than the measured ones).
if has tg-off || has tg-pl1 || has tg-pl2; then
    cp "$BIN" "$TMP/tollgate" || die "cannot copy $BIN"
    BIN_PATH=$BIN
    BIN=$TMP/tollgate
fi

# ---------------------------------------------------------------------------------------------
# The requests. The same headers for every proxy, as a browser or an app would send them: a
# Host name (CRS 920350 scores a numeric Host), a User-Agent and an Accept (CRS 920300/920320
# score their absence at PL2).

UA="Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
HOST=shop.example.com
BOUNDARY=----TollgateBenchBoundary7MA4YWxkTrZu0gW
MULTIPART=$TMP/upload.body
{
    part() { printf -- '--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' "$BOUNDARY" "$1" "$2"; }
    part title "Autumn trail notes"
    part description "Five days of walking in the valley, with distances, ascents and the places to stop for water."
    part visibility public
    printf -- '--%s\r\nContent-Disposition: form-data; name="notes"; filename="trail-notes.txt"\r\nContent-Type: text/plain\r\n\r\n' "$BOUNDARY"
    cat "$DATA/trail-notes.txt"
    printf -- '\r\n--%s--\r\n' "$BOUNDARY"
} >"$MULTIPART"
MULTIPART_BYTES=$(stat -c %s "$MULTIPART")
((MULTIPART_BYTES < 65536)) || die "the multipart body is $MULTIPART_BYTES bytes: over the 64 KiB tollgate inspects"
JSON_BYTES=$(stat -c %s "$DATA/order.json")

# req_path NAME, req_headers NAME (one "Name: value" a line), req_body NAME (file or empty)
req_path() {
    case $1 in get) echo "/search?q=shoes&page=2&sort=price" ;; json) echo /api/orders ;; multipart) echo /upload ;; esac
}
req_headers() {
    echo "User-Agent: $UA"
    echo "Accept-Language: en-US,en;q=0.5"
    echo "Accept-Encoding: gzip, deflate"
    case $1 in
        get) echo "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8" ;;
        json) echo "Accept: application/json"; echo "Content-Type: application/json" ;;
        multipart) echo "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
            echo "Content-Type: multipart/form-data; boundary=$BOUNDARY" ;;
    esac
}
req_body() {
    case $1 in get) echo "" ;; json) echo "$DATA/order.json" ;; multipart) echo "$MULTIPART" ;; esac
}
req_title() {
    case $1 in
        get) echo "GET, 3 query args" ;;
        json) echo "POST JSON $(awk -v b="$JSON_BYTES" 'BEGIN { printf "%.1f", b / 1000 }') KB" ;;
        multipart) echo "POST multipart $(awk -v b="$MULTIPART_BYTES" 'BEGIN { printf "%.1f", b / 1000 }') KB" ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# Configs

free_port UP_PORT
up_conf=$(nginx_conf upstream "
    server { listen 127.0.0.1:$UP_PORT backlog=4096; client_max_body_size 1m;
        location / { return 200 \"ok\"; }
        location = /nginx_status { stub_status; } }")

waf_yaml() { # config
    case $1 in
        tg-off) echo "waf: { mode: off }" ;;
        tg-pl1) echo "waf: { mode: block, paranoia: 1, inbound_threshold: 5, body_limit: 64k }" ;;
        tg-pl2) echo "waf: { mode: block, paranoia: 2, inbound_threshold: 5, body_limit: 64k }" ;;
    esac
}
tollgate_conf() { # name port admin_port waf_yaml [access_log_path]
    local dir=$TMP/$1 al="{ enabled: false }"
    mkdir -p "$dir"
    [[ -z ${5:-} ]] || al="{ enabled: true, path: $5 }"
    cat >"$dir/tollgate.yaml" <<EOF
listeners: [ { name: web, address: "127.0.0.1:$2" } ]
admin: { address: "127.0.0.1:$3" }
server: { threads: 1, pid_file: $dir/pid, upgrade_sock: $dir/sock }
access_log: $al
upstreams: { app: { backends: [ { address: "127.0.0.1:$UP_PORT" } ] } }
routes: [ { name: app, match: { path_prefix: / }, upstream: app } ]
$4
EOF
    echo "$dir/tollgate.yaml"
}

# ModSecurity: engine on, request bodies on (JSON through the JSON processor, as Debian's
# modsecurity.conf does), no response bodies, no audit log; crs-setup.conf, the paranoia level
# and the inbound threshold, then the CRS request rules: what tollgate's default loads.
modsec_conf() { # dir paranoia
    cat >"$1/modsecurity.conf" <<EOF
SecRuleEngine On
SecRequestBodyAccess On
SecRequestBodyLimit 13107200
SecRequestBodyNoFilesLimit 1048576
SecRequestBodyLimitAction Reject
SecRequestBodyJsonDepthLimit 512
SecArgumentsLimit 1000
SecRule REQUEST_HEADERS:Content-Type "^application/json" \\
    "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule REQBODY_ERROR "!@eq 0" \\
    "id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body.',logdata:'%{reqbody_error_msg}',severity:2"
SecRule MULTIPART_STRICT_ERROR "!@eq 0" \\
    "id:200003,phase:2,t:none,log,deny,status:400,msg:'Multipart request body failed strict validation'"
SecResponseBodyAccess Off
SecAuditEngine Off
SecTmpDir $1
SecDataDir $1
Include $CRS_SETUP
SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level=$2"
SecAction "id:900110,phase:1,nolog,pass,t:none,setvar:tx.inbound_anomaly_score_threshold=5,setvar:tx.outbound_anomaly_score_threshold=4"
Include $CRS_RULES/REQUEST-*.conf
EOF
}
nginx_proxy_conf() { # name config port -> path; bodies stay in memory (client_body_buffer_size)
    local modsec="" f
    [[ $2 != ng-pl* ]] || modsec="modsecurity on; modsecurity_rules_file $TMP/$1/modsecurity.conf;"
    f=$(nginx_conf "$1" "
    upstream app { server 127.0.0.1:$UP_PORT; keepalive 128; keepalive_requests 1000000; }
    client_max_body_size 1m;
    client_body_buffer_size 128k;
    $modsec
    server {
        listen 127.0.0.1:$3 backlog=4096;
$PROXY_LOCATION
    }")
    if [[ -n $modsec ]]; then
        modsec_conf "$TMP/$1" "${2#ng-pl}"
        sed -i "1i load_module $MODSEC_MODULE;" "$f"
    fi
    echo "$f"
}

# ---------------------------------------------------------------------------------------------
# Start everything (idle proxies cost nothing; each is loaded alone)

start_nginx upstream "$up_conf" "$LOAD_CORE" "$UP_PORT"; UP_PID=$STARTED
mapfile -t UP_PIDS < <(children "$UP_PID")
UP_PIDS+=("$UP_PID")

declare -A PORT PROC_PIDS LOGF WAFY
for c in "${CONFIG_LIST[@]}"; do
    free_port "PORT[$c]"
    if [[ $c == tg-* ]]; then
        free_port admin
        WAFY[$c]=$(waf_yaml "$c")
        conf=$(tollgate_conf "$c" "${PORT[$c]}" "$admin" "${WAFY[$c]}")
        if ! out=$(timeout 60 "$BIN" check -c "$conf" 2>&1); then
            if [[ $c == tg-off && $out == *waf* ]]; then
                # A binary from before the WAF: its baseline has no waf section.
                log "tg-off: $BIN does not know \`waf:\` ($(tail -1 <<<"$out" | cut -c1-200)); its baseline runs without it"
                ODD+=("tg-off ran without a waf section: this binary does not know \`waf:\`")
                WAFY[$c]=""
                conf=$(tollgate_conf "$c" "${PORT[$c]}" "$admin" "")
            else
                die "$c: tollgate check -c $conf failed: $(tail -5 <<<"$out")"
            fi
        fi
        t0=$SECONDS
        start_tollgate "$c" "$conf" "$PROXY_CORE" "${PORT[$c]}"
        PROC_PIDS[$c]=$STARTED
        LOGF[$c]=$TMP/$c.log
        log "$c: tollgate pid $STARTED on :${PORT[$c]} (${WAFY[$c]:-no waf section}), listening after $((SECONDS - t0))s"
    else
        conf=$(nginx_proxy_conf "$c" "$c" "${PORT[$c]}")
        t0=$SECONDS
        start_nginx "$c" "$conf" "$PROXY_CORE" "${PORT[$c]}"
        for ((i = 0; i < 50; i++)); do # the master listens before it forks the worker
            mapfile -t workers < <(children "$STARTED")
            ((${#workers[@]} == 0)) || break
            sleep 0.1
        done
        ((${#workers[@]} == 1)) || die "$c: expected one nginx worker, got: ${workers[*]}"
        PROC_PIDS[$c]="$STARTED ${workers[*]}"
        LOGF[$c]=$TMP/$c/error.log
        log "$c: nginx pid $STARTED (worker ${workers[*]}) on :${PORT[$c]}, listening after $((SECONDS - t0))s"
    fi
done

# ---------------------------------------------------------------------------------------------
# Checks: every (proxy, request) must answer 200 with the upstream's "ok". A 403 is the WAF
# blocking a benign request: that cell is reported, not timed. Which rules each request
# matched, blocked or not, comes from a second "diag" instance of every WAF config that logs
# them (tollgate: an access log; nginx: error_log at info, where ModSecurity writes each match):
# each request is sent to it once before the checks.

curl_req() { # port request out_body -> "code"
    local args=(-s --max-time 10 -o "$3" -w '%{http_code}' -H "Host: $HOST") h body
    while IFS= read -r h; do args+=(-H "$h"); done < <(req_headers "$2")
    body=$(req_body "$2")
    [[ -z $body ]] || args+=(--data-binary "@$body")
    curl "${args[@]}" "http://127.0.0.1:$1$(req_path "$2")" || echo " curl-failed"
}

declare -A MATCHED DIAG WAF_LOG
diag() { # config
    local c=$1 port admin conf pid q from i=0 log
    free_port port
    if [[ $c == tg-* ]]; then
        free_port admin
        log=$TMP/$c.diag/access.log
        conf=$(tollgate_conf "$c.diag" "$port" "$admin" "${WAFY[$c]}" "$log")
        start_tollgate "$c.diag" "$conf" "$PROXY_CORE" "$port"; pid=$STARTED
        for q in "${REQUEST_LIST[@]}"; do DIAG[$c.$q]=$(curl_req "$port" "$q" "$TMP/diag.body"); done
        sleep 0.5 # the access log is written by its own thread
        stop "$pid"
        for q in "${REQUEST_LIST[@]}"; do # one line a request, in order
            i=$((i + 1))
            line=$(sed -n "${i}p" "$log" 2>/dev/null || true)
            # "screened":"waf:920350,949110" (what the WAF matched, blocked or not)
            MATCHED[$c.$q]=$(grep -oE '"screened":"waf:[0-9,]+' <<<"$line" | grep -oE '[0-9]+' | sort -u | tr '\n' ' ' || true)
            DIAG[$c.$q]+=", access log \"status\":$(grep -oE '"status":[0-9]+' <<<"$line" | cut -d: -f2) $(grep -oE '"screened":"[^"]*"' <<<"$line" || true)"
        done
        # Its own log says, per match, the variable and the value ("waf blocked: 942100 ARGS:q=...").
        WAF_LOG[$c]=$(grep -oE 'waf (blocked|detected|matched): .*' "$TMP/$c.diag.log" | cut -c1-600 || true)
    else
        conf=$(nginx_proxy_conf "$c.diag" "$c" "$port")
        sed -i 's|/error.log warn;|/error.log info;|' "$conf"
        start_nginx "$c.diag" "$conf" "$PROXY_CORE" "$port"; pid=$STARTED
        log=$TMP/$c.diag/error.log
        for q in "${REQUEST_LIST[@]}"; do
            from=$(($(wc -l <"$log") + 1))
            DIAG[$c.$q]=$(curl_req "$port" "$q" "$TMP/diag.body")
            MATCHED[$c.$q]=$(tail -n +"$from" "$log" | grep -oE '\[id "[0-9]+"\]' | grep -oE '[0-9]+' | sort -u | tr '\n' ' ' || true)
        done
        stop "$pid" TERM
    fi
}
for c in "${CONFIG_LIST[@]}"; do
    case $c in tg-pl* | ng-pl*) diag "$c" ;; esac
done

declare -A BLOCKED
for q in "${REQUEST_LIST[@]}"; do
    for c in "${CONFIG_LIST[@]}"; do
        code=$(curl_req "${PORT[$c]}" "$q" "$TMP/check.body")
        got=$(head -c 200 "$TMP/check.body" 2>/dev/null || true)
        ids=${MATCHED[$c.$q]:-}
        if [[ $code == 200 && $got == ok ]]; then
            [[ -z $ids ]] || ODD+=("$c $q: answered 200 but matched rules ${ids}(under the threshold)")
            log "check $c $q: 200 ok${ids:+; matched $ids}"
            continue
        fi
        BLOCKED[$c.$q]=$code
        why="rules matched: ${ids:-none seen}"
        [[ $c != tg-pl* ]] || why+="; diag instance: ${DIAG[$c.$q]:-}; its log: $(grep -F -m1 "$(cut -d' ' -f1 <<<"$ids")" <<<"${WAF_LOG[$c]:-}" || true)"
        [[ $c == *-pl* ]] || why="log: $(tail -3 "${LOGF[$c]}" | cut -c1-300)"
        ODD+=("$c $q: the check got $code (body '$(tr '\n' ' ' <<<"${got:0:60}")'), not 200 ok: not timed. $why")
        log "check $c $q: $code, not timed. $why"
    done
done

# ---------------------------------------------------------------------------------------------
# Runs

# h2load's arguments for a request, less -n.
h2load_args() { # request
    ARGS=(--h1 -t 1 -c "$CONNS" -m 1 -H ":authority: $HOST")
    local h body
    while IFS= read -r h; do ARGS+=(-H "$h"); done < <(req_headers "$1")
    body=$(req_body "$1")
    [[ -z $body ]] || ARGS+=(-d "$body")
}

# One run of n requests: sets RESULT="cpu_us n non2xx upstream_missing proxy_busy load_busy
# foreign" and FOREIGN. Dies if h2load fails.
run_once() { # config request n tag
    local c=$1 q=$2 n=$3 tag=$4 pids f="$TMP/$1.$2.h2load.$4" rc=0
    read -r -a pids <<<"${PROC_PIDS[$c]}"
    ((SECONDS < MAX_SECONDS)) || die "over MAX_SECONDS=$MAX_SECONDS before $c $q $tag"
    h2load_args "$q"
    local u0 u1 c0 c1 up0 up1 kid0 kid1 pc0 lc0 pc1 lc1
    u0=$(upstream_count requests)
    kid0=$(kids_ticks); up0=$(cpu_ticks "${UP_PIDS[@]}"); c0=$(cpu_ticks "${pids[@]}")
    pc0=$(core_jiffies "$PROXY_CORE"); lc0=$(core_jiffies "$LOAD_CORE")
    taskset -c "$LOAD_CORE" timeout -k 5 "$RUN_TIMEOUT" h2load "${ARGS[@]}" -n "$n" \
        "http://127.0.0.1:${PORT[$c]}$(req_path "$q")" >"$f" 2>&1 || rc=$?
    pc1=$(core_jiffies "$PROXY_CORE"); lc1=$(core_jiffies "$LOAD_CORE")
    c1=$(cpu_ticks "${pids[@]}"); up1=$(cpu_ticks "${UP_PIDS[@]}"); kid1=$(kids_ticks)
    u1=$(upstream_count requests)
    if ((rc != 0)) || ! grep -q '^finished in' "$f"; then
        echo "--- h2load ${ARGS[*]} -n $n against $c (rc $rc):" >&2; tail -20 "$f" >&2
        echo "--- $c log tail:" >&2; tail -20 "${LOGF[$c]}" >&2 2>/dev/null || true
        KEEP=1
        die "$c $q $tag: h2load failed (rc $rc); temp dir kept"
    fi
    local total ok2xx non2xx missing cpu_us pbusy lbusy
    total=$(awk '/^requests:/ {print $2}' "$f")
    ok2xx=$(awk '/^status codes:/ {print $3}' "$f")
    non2xx=$((total - ok2xx))
    missing=$((n - (u1 - u0 - 1))) # requests that never reached the upstream (minus our status read)
    cpu_us=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v r="$total" 'BEGIN { printf "%.2f", t / hz * 1e6 / r }')
    pbusy=$(busy_pct "$pc0" "$pc1"); lbusy=$(busy_pct "$lc0" "$lc1")
    # Ours: the proxy, the upstream, h2load and curl.
    FOREIGN=$(foreign_pct "$pc0" "$pc1" "$lc0" "$lc1" $((c1 - c0 + up1 - up0 + kid1 - kid0)))
    RESULT="$cpu_us $total $non2xx $missing $pbusy $lbusy $FOREIGN"
    TICKS=$((c1 - c0))
    log "$c $q $tag: $total requests, ${cpu_us} cpu-us/req, $non2xx non-2xx, $missing not at the upstream, $(awk '/^finished in/ {print $4}' "$f") req/s (cores busy: proxy ${pbusy}%, load ${lbusy}%, others ${FOREIGN}%)"
}

# Warm-up and sizing: runs of 50, 200, 800, ... requests until one takes 0.5 s of proxy CPU;
# N = RUN_CPU / that run's CPU per request, to 2 significant digits, within MIN_N..MAX_N.
declare -A N
size() { # config request
    local c=$1 q=$2 n=50 i
    for ((i = 0; i < 8; i++)); do
        run_once "$c" "$q" "$n" "warm-$n"
        ((TICKS < CLK_TCK / 2 && n < MAX_N)) || break
        n=$((n * 4))
    done
    N[$c.$q]=$(awk -v t="$TICKS" -v n="$n" -v hz="$CLK_TCK" -v cpu="$RUN_CPU" -v lo="$MIN_N" -v hi="$MAX_N" -v c="$CONNS" 'BEGIN {
        per = (t > 0 ? t / hz / n : 1e-6); x = cpu / per;
        if (x < lo) x = lo; if (x > hi) x = hi; if (x < c) x = c;
        e = 10 ^ (int(log(x) / log(10)) - 1); printf "%d", int(x / e + 0.5) * e }')
    log "$c $q: $((N[$c.$q])) requests a run"
}

# Before a run: waits, 0.5 s samples, until other processes (a build next door) take at most
# FOREIGN_MAX % of a core, for QUIET_WAIT seconds in all over the script. Ours idle meanwhile.
QUIET_LEFT=$((QUIET_WAIT * 2))
QUIET_WAITED=0
wait_quiet() {
    local a0 b0 a1 b1 o
    while :; do
        a0=$(core_jiffies "$PROXY_CORE"); b0=$(core_jiffies "$LOAD_CORE")
        sleep 0.5
        a1=$(core_jiffies "$PROXY_CORE"); b1=$(core_jiffies "$LOAD_CORE")
        o=$(foreign_pct "$a0" "$a1" "$b0" "$b1")
        ((${o/\?/0} > FOREIGN_MAX && QUIET_LEFT > 0)) || return 0
        QUIET_LEFT=$((QUIET_LEFT - 1))
        QUIET_WAITED=$((QUIET_WAITED + 1))
        ((QUIET_WAITED % 20 != 1)) || log "other processes take ${o}% of a core: waiting ($((QUIET_LEFT / 2)) s of waiting left)"
    done
}

bench() { # config request run
    local c=$1 q=$2 r=$3
    while :; do
        wait_quiet
        run_once "$c" "$q" "${N[$c.$q]}" "run-$r"
        # With no waiting left, a redo would meet the same load: none any more.
        ((QUIET_LEFT > 0)) || REDOS=0
        busy_redo "$c $q run $r" || break
    done
    [[ -z $BUSY_KEPT ]] || BUSY_RUNS+=("$c $q run $r: ${FOREIGN}%")
    echo "$RESULT" >>"$TMP/$c.$q.results"
    read -r _ total non2xx missing _ <<<"$RESULT"
    ((non2xx == 0)) || ODD+=("$c $q run $r: $non2xx of $total responses not 2xx")
    ((missing == 0)) || ODD+=("$c $q run $r: $missing of ${N[$c.$q]} requests did not reach the upstream")
}

timed() { [[ -z ${BLOCKED[$1.$2]:-} ]]; } # config request
BUSY_RUNS=() # runs kept although other processes took more than FOREIGN_MAX % of a core

for q in "${REQUEST_LIST[@]}"; do
    for c in "${CONFIG_LIST[@]}"; do
        if timed "$c" "$q"; then size "$c" "$q"; fi
    done
done
# Interleave the measured runs so slow drift in background load hits every cell alike.
for ((r = 1; r <= RUNS; r++)); do
    for q in "${REQUEST_LIST[@]}"; do
        for c in "${CONFIG_LIST[@]}"; do
            if timed "$c" "$q"; then bench "$c" "$q" "$r"; fi
        done
    done
done

if ((${#BUSY_RUNS[@]})); then
    ODD+=("${#BUSY_RUNS[@]} runs kept (no redos left) while other processes took more than $FOREIGN_MAX % of a core: $(printf '%s; ' "${BUSY_RUNS[@]}")")
fi
declare -A RSS
for c in "${CONFIG_LIST[@]}"; do
    read -r -a pids <<<"${PROC_PIDS[$c]}"
    if ! kill -0 "${pids[0]}" 2>/dev/null; then ODD+=("$c exited during the runs: $(tail -3 "${LOGF[$c]}")"); continue; fi
    RSS[$c]=$(awk '/^VmRSS:/ {s += $2} END {print int(s / 1024)}' $(printf '/proc/%s/status ' "${pids[@]}") 2>/dev/null || echo "?")
    if [[ $c == tg-* ]]; then
        # (the WAF's own "waf blocked" warnings are the checks above)
        # and the rules it cannot run, listed at start, are summed up below the table.
        bad=$(grep -E ' (ERROR|WARN) |panicked' "${LOGF[$c]}" | grep -vE ' WARN waf: waf (blocked|detected): | WARN waf: waf: rule [0-9]+ .* not run: ' || true)
        if [[ -n $bad ]]; then
            ODD+=("$c log: $(wc -l <<<"$bad") ERROR/WARN lines, last: $(tail -1 <<<"$bad" | cut -c1-300)")
        fi
    elif grep -qE '\[(error|crit|alert|emerg)\]' "${LOGF[$c]}"; then
        ODD+=("$c error log: $(grep -cE '\[(error|crit|alert|emerg)\]' "${LOGF[$c]}") lines, last: $(grep -E '\[(error|crit|alert|emerg)\]' "${LOGF[$c]}" | tail -1 | cut -c1-300)")
    fi
done

# ---------------------------------------------------------------------------------------------
# Table

# cell config request column: the median, or why there is none
med() {
    if [[ -n ${BLOCKED[$1.$2]:-} ]]; then echo "${BLOCKED[$1.$2]}!"
    elif [[ -f $TMP/$1.$2.results ]]; then median_col "$TMP/$1.$2.results" "$3"
    else echo "-"; fi
}
num() { [[ $1 =~ ^[0-9.]+$ ]]; }
fmt() { if num "$1"; then printf '%.1f' "$1"; else echo "$1"; fi; }
diff_us() { if num "$1" && num "$2"; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f", a - b }'; else echo "-"; fi; }

echo
echo "WAF cost, tollgate (native SecLang engine) vs nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') + ModSecurity $(dpkg-query -W -f '${Version}' libmodsecurity3 2>/dev/null | sed 's/-.*//' || echo '?'), OWASP CRS $(dpkg-query -W -f '${Version}' modsecurity-crs 2>/dev/null | sed 's/-.*//' || echo '?')"
echo "  $(date -u +%F), $NCPU cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), load avg at end $(cut -d' ' -f1-3 /proc/loadavg)"
if has tg-off || has tg-pl1 || has tg-pl2; then echo "  tollgate: $BIN_PATH (built $BIN_BUILT)"; fi
echo "Proxy under test on core $PROXY_CORE (tollgate server.threads 1; nginx worker_processes 1);"
echo "  $(h2load --version | head -1) --h1 -t1 -c$CONNS and the nginx 'return 200' upstream on core $LOAD_CORE."
echo "CPU µs per request: utime+stime delta of the proxy (/proc/PID/stat; nginx master+worker)"
echo "  over a run of a fixed number of requests (sized to ~${RUN_CPU} s of proxy CPU) / requests;"
echo "  median of $RUNS runs. cost = PL − off (tollgate) and PL − plain nginx (ModSecurity)."
echo "  Waf: mode block, inbound_threshold 5, CRS request rules; nginx: SecRuleEngine On, same CRS"
echo "  files, tx.paranoia_level, JSON body processor. 'NNN!' = the check got NNN: not timed."
echo
printf '%-24s | %8s %8s %8s %8s %8s | %8s %8s %8s %8s %8s\n' "CPU µs/request" "tg off" "tg PL1" "tg PL2" "cost 1" "cost 2" \
    "nginx" "ModS PL1" "ModS PL2" "cost 1" "cost 2"
for q in "${REQUEST_LIST[@]}"; do
    a=$(med tg-off "$q" 1); b=$(med tg-pl1 "$q" 1); d=$(med tg-pl2 "$q" 1)
    e=$(med ng "$q" 1); g=$(med ng-pl1 "$q" 1); h=$(med ng-pl2 "$q" 1)
    printf '%-24s | %8s %8s %8s %8s %8s | %8s %8s %8s %8s %8s\n' "$(req_title "$q")" \
        "$(fmt "$a")" "$(fmt "$b")" "$(fmt "$d")" "$(diff_us "$b" "$a")" "$(diff_us "$d" "$a")" \
        "$(fmt "$e")" "$(fmt "$g")" "$(fmt "$h")" "$(diff_us "$g" "$e")" "$(diff_us "$h" "$e")"
done
echo
printf '%-24s | %8s %8s\n' "cost tollgate/ModSec" "PL1" "PL2"
for q in "${REQUEST_LIST[@]}"; do
    r1=-; r2=-
    for pl in 1 2; do
        t=$(diff_us "$(med tg-pl$pl "$q" 1)" "$(med tg-off "$q" 1)"); m=$(diff_us "$(med ng-pl$pl "$q" 1)" "$(med ng "$q" 1)")
        if [[ $t != - && $m != - ]]; then printf -v "r$pl" '%s' "$(awk -v a="$t" -v b="$m" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "-" }')"; fi
    done
    printf '%-24s | %8s %8s\n' "$(req_title "$q")" "$r1" "$r2"
done
echo
printf '%-24s | %8s %8s %8s %17s | %8s %8s %8s\n' "requests/run; non-2xx" "tg off" "tg PL1" "tg PL2" "" "nginx" "ModS PL1" "ModS PL2"
for q in "${REQUEST_LIST[@]}"; do
    row=()
    for c in tg-off tg-pl1 tg-pl2 ng ng-pl1 ng-pl2; do
        if [[ -f $TMP/$c.$q.results ]]; then row+=("${N[$c.$q]};$(sum_col "$TMP/$c.$q.results" 3)"); else row+=("-"); fi
    done
    printf '%-24s | %8s %8s %8s %17s | %8s %8s %8s\n' "$(req_title "$q")" "${row[0]}" "${row[1]}" "${row[2]}" "" "${row[3]}" "${row[4]}" "${row[5]}"
done
echo
line="RSS MB at the end:"
for c in "${CONFIG_LIST[@]}"; do line+=" $c ${RSS[$c]:-?}"; done
echo "$line; whole script: ${SECONDS}s, of which $((QUIET_WAITED / 2))s waiting for other processes"
for c in tg-pl1 tg-pl2; do
    if has "$c"; then
        notrun=$(grep -oE 'waf: rule [0-9]+ \(/[^)]*/[^/)]*\) not run: [^:]*' "${LOGF[$c]}" |
            sed -E 's/waf: rule ([0-9]+) \(.*\) not run: (.*)/\1 (\2)/' | tr '\n' ',' | sed 's/,$//; s/,/, /g' || true)
        echo "Rules tollgate loads but does not run (its log at start): ${notrun:-none}"
        break
    fi
done
if [[ ",$REQUESTS," == *,get,* ]]; then
    cost=$(diff_us "$(med tg-pl1 get 1)" "$(med tg-off get 1)")
    if num "${cost#+}"; then
        verdict=$(awk -v c="$cost" -v t="$TARGET_US" 'BEGIN { print (c + 0 <= t ? "met" : "NOT met") }')
        echo "Target: tollgate PL1 adds ≤ $TARGET_US µs CPU to the GET: $cost µs, $verdict."
    else
        echo "Target: tollgate PL1 adds ≤ $TARGET_US µs CPU to the GET: not measured."
    fi
fi
if ((${#ODD[@]})); then
    echo "Odd:"
    printf '  %s\n' "${ODD[@]}"
fi
