# Shell helpers shared by the benchmark scripts (sourced, not run): logging, the tollgate build,
# process stop and wait, free ports, readiness, CPU ticks and core load, redoing runs that other
# processes disturbed, nginx configs, medians. They expect the sourcing script to define `die`,
# `TMP` and the `PIDS` array (and `KEEP`); other variables a helper reads are named at it.

log() { echo "# $*" >&2; }

# Builds BIN if it is missing (an error if TOLLGATE_BIN names it); a BIN at the default path that
# is older than the sources is used as it is, and ODD says so. Needs ROOT, BIN, ODD.
build_tollgate() {
    local newer
    if [[ ! -x $BIN ]]; then
        [[ -z ${TOLLGATE_BIN:-} ]] || die "$BIN is not an executable"
        log "building $BIN (cargo build --release --bin tollgate; ~5 min cold)"
        (cd "$ROOT" && timeout 1800 cargo build --release --bin tollgate) >&2 || die "cargo build failed"
        [[ -x $BIN ]] || die "cargo build left no $BIN"
    elif [[ -z ${TOLLGATE_BIN:-} ]]; then
        newer=$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$BIN" -print -quit 2>/dev/null || true)
        [[ -z $newer ]] || ODD+=("$BIN is older than $newer: not rebuilt (cargo build --release --bin tollgate)")
    fi
}

# Stops every process started (INT, then KILL after 5 s) and removes TMP unless KEEP=1.
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do stop_wait "$p"; done
    if [[ $KEEP == 1 ]]; then echo "# kept $TMP" >&2; else rm -rf "$TMP"; fi
}

# Waits (bounded) for a process we started to exit, then kills it.
stop_wait() {
    local p=$1 i
    for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
stop() { # pid [signal]
    kill "-${2:-INT}" "$1" 2>/dev/null || true
    stop_wait "$1"
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# free_port VAR: sets VAR to a free TCP port below the ephemeral range. Not $(free_port): the
# subshell would lose NEXT_PORT and hand out the same port twice.
NEXT_PORT=$((20000 + RANDOM % 8000))
free_port() {
    local p
    for ((p = NEXT_PORT; p < NEXT_PORT + 500; p++)); do
        if [[ -z $(ss -Htan "sport = :$p") ]]; then NEXT_PORT=$((p + 1)); printf -v "$1" '%s' "$p"; return; fi
    done
    die "no free port near $NEXT_PORT"
}

wait_port() { # port what pid: waits until that very process listens on the port
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$3" 2>/dev/null || die "$2 exited at start; log: $(tail -5 "$TMP/$2.log" 2>/dev/null)"
        [[ $(ss -Htlnp "sport = :$1") == *"pid=$3,"* ]] && return 0
        sleep 0.1
    done
    die "$2 (pid $3) did not listen on $1 within 10s; log: $(tail -5 "$TMP/$2.log" 2>/dev/null)"
}

# utime+stime (clock ticks) of a process and its children's threads: nginx master + workers,
# or every thread of tollgate (the per-process stat line already sums its threads).
cpu_ticks() {
    local total=0 p s
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }            # drop "pid (comm) "
        read -r -a f <<<"$s"   # f[0] is field 3 (state): utime is field 14 -> f[11]
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
children() { pgrep -P "$1" || true; }

# utime+stime (clock ticks) of this shell's finished children (h2load, curl), /proc/$$/stat
# fields 16 and 17.
kids_ticks() {
    local s
    s=$(cat "/proc/$$/stat")
    s=${s##*) }
    read -r -a f <<<"$s"
    echo $((f[13] + f[14]))
}

# "busy total user+system" jiffies of one core (/proc/stat; busy = all but idle and iowait):
# how busy the proxy's and the load generator's cores were over a run (anything else running
# counts too). user+system leaves out irq and softirq time, which no process is charged with
# (the kernel's loopback work is much of it).
core_jiffies() {
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t, $2 + $3 + $4 }' /proc/stat
}
busy_pct() { # "busy0 total0" "busy1 total1" [ticks to leave out]: % of the core's time
    awk -v a="$1" -v b="$2" -v own="${3:-0}" 'BEGIN { split(a, x, " "); split(b, y, " ");
        if (y[2] > x[2]) { v = 100 * (y[1] - x[1] - own) / (y[2] - x[2]); printf "%.0f", v < 0 ? 0 : v } else print "?" }'
}
# What of both cores' user+system time went to other processes than ours, in % of one core:
# core_jiffies of the proxy core and of the load core, before and after, less OURS ticks (what
# cpu_ticks and kids_ticks counted meanwhile). "?" if no time passed.
foreign_pct() { # p0 p1 l0 l1 [ours]
    awk -v p0="$1" -v p1="$2" -v l0="$3" -v l1="$4" -v ours="${5:-0}" 'BEGIN {
        split(p0, a, " "); split(p1, b, " "); split(l0, c, " "); split(l1, d, " ");
        if (b[2] <= a[2]) { print "?"; exit }
        v = 100 * (b[3] - a[3] + d[3] - c[3] - ours) / (b[2] - a[2]); printf "%.0f", v < 0 ? 0 : v }'
}

# After a measured run that set FOREIGN (foreign_pct over it): succeeds when the run is to be
# done again, because other processes (a build or test next door) took more than FOREIGN_MAX %
# of a core and redos are left (REDOS, per script, counts down); logs it and first sleeps PAUSE
# seconds if given. Else fails, with BUSY_KEPT=1 if the run is kept although it was disturbed.
# shellcheck disable=SC2034 # BUSY_KEPT is for the caller
busy_redo() { # label [pause]
    BUSY_KEPT=
    ((${FOREIGN/\?/0} > FOREIGN_MAX)) || return 1
    if ((REDOS <= 0)); then BUSY_KEPT=1; return 1; fi
    REDOS=$((REDOS - 1))
    log "$1: other processes took ${FOREIGN}% of a core: again${2:+ in $2 s} ($REDOS redos left)"
    [[ -z ${2:-} ]] || sleep "$2"
}

# What the upstream nginx has done so far, by its stub_status (this read counts too): `accepts`
# (connections) or `requests`. Needs UP_PORT.
upstream_count() { # accepts|requests
    local col
    case $1 in accepts) col=1 ;; requests) col=3 ;; *) die "upstream_count $1" ;; esac
    curl -s --max-time 5 "http://127.0.0.1:$UP_PORT/nginx_status" | awk -v c="$col" 'NR == 3 {print $c}'
}

# Both start_* set STARTED to the new pid (not $(...): the pid must be tracked by the sourcing
# shell).
start_tollgate() { # name conf core port; needs BIN
    taskset -c "$3" "$BIN" -c "$2" >"$TMP/$1.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
    wait_port "$4" "$1" "$STARTED"
}

start_nginx() { # name conf core port; needs NGINX
    taskset -c "$3" "$NGINX" -e "$TMP/$1/error.log" -c "$2" >"$TMP/$1.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
    wait_port "$4" "$1" "$STARTED"
}

# Writes TMP/NAME/nginx.conf (one worker, no access log, temp paths in that dir, BODY inside
# `http {}`) and prints its path. Needs NOFILE and NGINX_WC.
nginx_conf() { # name body
    local dir=$TMP/$1
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $NGINX_WC; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
$2
}
EOF
    echo "$dir/nginx.conf"
}

# The `location /` of every nginx proxy under test (inside its `server {}`): keep-alive HTTP/1.1
# to `upstream app`. One copy, so nginx does the same work in every script.
# shellcheck disable=SC2016,SC2034 # nginx's $host, not the shell's; the scripts use it
PROXY_LOCATION='        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }'

median_col() { # file column
    awk -v c="$2" '{print $c}' "$1" | sort -g | awk '{v[NR] = $1} END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
sum_col() { awk -v c="$2" '{s += $c} END {print s + 0}' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
