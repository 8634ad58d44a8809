#!/usr/bin/env bash
# `make run-s3`: SeaweedFS (S3 on 127.0.0.1:8333) and the proxy (STORAGE_BACKEND=s3) together.
# Ctrl-C stops both: the proxy first, then SeaweedFS (SIGTERM, SIGKILL after 3 s).
# Everything listens on loopback. Ports and paths can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
WEED=${WEED:-$VENV/bin/weed}
DATA=${SEAWEED_DIR:-$PWD/.cache/seaweedfs}
S3_PORT=${S3_PORT:-8333}
# SeaweedFS also listens on each port + 10000 (gRPC); keep clear of the proxy's 8080.
MASTER_PORT=${SEAWEED_MASTER_PORT:-9333}
VOLUME_PORT=${SEAWEED_VOLUME_PORT:-9334}
FILER_PORT=${SEAWEED_FILER_PORT:-8888}

[ -x "$WEED" ] || WEED=$(command -v weed) || {
    echo "run-s3: weed not found; install the test extra (pip install -e '.[test]')" >&2
    exit 1
}

export STORAGE_BACKEND=s3
export AWS_ENDPOINT_URL=${AWS_ENDPOINT_URL:-http://127.0.0.1:$S3_PORT}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-local}  # SeaweedFS without identities takes any
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-local}
export AWS_REGION=${AWS_REGION:-us-east-1}
export S3_BUCKET=${S3_BUCKET:-oci-cache}
export PROXY_MODE=${PROXY_MODE:-transparent}
export LISTEN_ADDR=${LISTEN_ADDR:-127.0.0.1:8080}

mkdir -p "$DATA/logs"
weed_pid="" proxy_pid=""

stop() {
    trap - INT TERM EXIT
    if [ -n "$proxy_pid" ] && kill -0 "$proxy_pid" 2>/dev/null; then
        kill -TERM "$proxy_pid" 2>/dev/null || true
        wait "$proxy_pid" 2>/dev/null || true
    fi
    if [ -n "$weed_pid" ] && kill -0 "$weed_pid" 2>/dev/null; then
        kill -TERM "$weed_pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6; do
            kill -0 "$weed_pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$weed_pid" 2>/dev/null || true  # its graceful stop can hang for a minute
        wait "$weed_pid" 2>/dev/null || true
    fi
    for port in "$S3_PORT" "$MASTER_PORT" "$VOLUME_PORT" "$FILER_PORT"; do
        rm -f /tmp/seaweedfs-*-"$port".sock /tmp/seaweedfs-*-"$((port + 10000))".sock
    done
}
trap stop INT TERM EXIT

# Its own session, so Ctrl-C reaches only this script, which stops things in order.
setsid "$WEED" -logdir="$DATA/logs" server \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -s3 -s3.port="$S3_PORT" -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.port="$MASTER_PORT" -volume.port="$VOLUME_PORT" -filer.port="$FILER_PORT" \
    -dir="$DATA" >"$DATA/logs/weed.out" 2>&1 &
weed_pid=$!

echo "run-s3: waiting for SeaweedFS S3 on $AWS_ENDPOINT_URL (log: $DATA/logs/weed.out)"
for _ in $(seq 1 120); do
    kill -0 "$weed_pid" 2>/dev/null || { echo "run-s3: weed exited" >&2; tail -20 "$DATA/logs/weed.out" >&2; exit 1; }
    if "$VENV/bin/python" -c "import boto3, sys; boto3.client('s3').list_buckets()" 2>/dev/null; then
        break
    fi
    sleep 0.5
done

echo "run-s3: proxy on $LISTEN_ADDR, bucket $S3_BUCKET${S3_PREFIX:+, prefix $S3_PREFIX}"
"$VENV/bin/gunicorn" -c gunicorn.conf.py wsgi:app &
proxy_pid=$!
wait -n "$proxy_pid" "$weed_pid" || true  # either one ending (or Ctrl-C) stops both
