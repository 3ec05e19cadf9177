# SPDX-License-Identifier: MIT
# Shell helpers shared by the by-hand benchmarks (sourced, not run): stopping what they
# started by pid, free loopback ports, waiting for a server to listen. BENCH_NAME prefixes the
# error messages; PY (default python3) is the interpreter used for the socket one-liners.

stop_pid() { # pid: SIGTERM, then SIGKILL after 10 s
        local p=$1
        [ -n "$p" ] || return 0
        kill "$p" 2>/dev/null || return 0
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || { wait "$p" 2>/dev/null || true; return 0; }; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
}

free_port() { # a free TCP port on 127.0.0.1
        ${PY:-python3} -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port pid name: until 127.0.0.1:port accepts (10 s), or exit if pid died
        for _ in $(seq 100); do
                ${PY:-python3} -c "import socket; socket.create_connection(('127.0.0.1',$1),1).close()" 2>/dev/null && return 0
                kill -0 "$2" 2>/dev/null || { echo "${BENCH_NAME:-bench}: $3 did not start" >&2; exit 1; }
                sleep 0.1
        done
        echo "${BENCH_NAME:-bench}: $3 does not listen on $1" >&2
        exit 1
}

make_server_cert() { # dir hub: dir/server.crt + dir/server.key, EC P-256, for 127.0.0.1 and hub
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
                -keyout "$1/server.key" -out "$1/server.crt" -subj "/CN=127.0.0.1" \
                -addext "subjectAltName=IP:127.0.0.1,DNS:$2" 2>/dev/null
        chmod 600 "$1/server.key"
}

write_mqtt_config() { # dir hub mqtt-port metrics-listen max-inflight: dir/fieldhub.yaml (+ owner.key)
        # for an MQTT/TLS ingest benchmark: the generator's connections all come from 127.0.0.1
        head -c 32 /dev/urandom | base64 > "$1/owner.key"
        chmod 600 "$1/owner.key"
        cat > "$1/fieldhub.yaml" <<EOF_CONFIG
hub:
  host_name: $2
  policies:
    - name: iothubowner
      key_file: $1/owner.key
state_dir: $1/state
log:
  level: warning
  target: stderr
admin:
  socket: $1/admin.sock
service_api:
  listen: ["127.0.0.1:0"]
metrics:
  listen: "$4"
mqtt:
  listen: ["127.0.0.1:$3"]
  tls:
    cert_file: $1/server.crt
    key_file: $1/server.key
  limits:
    max_connections: 20000
    max_connections_per_address: 20000
    max_inflight: $5 # the generator's window: fieldhub must not hold input below it
EOF_CONFIG
}
