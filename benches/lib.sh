# Shell helpers shared by the benchmark scripts (sourced, not run): process stop and wait,
# free ports, readiness, CPU ticks. They expect the sourcing script to define `die`, `TMP` and
# the `PIDS` array (and `KEEP`).

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
