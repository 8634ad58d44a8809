#!/usr/bin/env bash
# What `make test` needs beyond the virtualenv: Debian packages (the real upstream registry,
# the real clients, nginx). Run as root on Debian/Ubuntu, installs whichever are missing
# with apt-get and stops the services their packages start (the tests start private
# loopback instances). Otherwise prints the one command that would, and exits 1.
# .ci/run calls it with --stop-services: on a throw-away CI machine the system services
# are stopped even when the packages were already there.
set -euo pipefail

# docker-registry: the real upstream (distribution 2.8); skopeo: the real client;
# apache2-utils: htpasswd (bcrypt); strace: counts sendfile calls of the serving path;
# make, python3-venv: the two commands; procps, iproute2: ps/ss for the harness;
# nginx (TLS in front of gunicorn), containerd and podman (the clients of docs/clients.md),
# wget (the compose file's SeaweedFS healthcheck): tests/e2e/test_deploy_*.py.
# tinyproxy: the corporate forward proxy of tests/e2e/test_upstream_network.py.
PACKAGES=(
    docker-registry skopeo apache2-utils strace make python3-venv procps iproute2
    nginx containerd podman wget tinyproxy
)
# Started by those packages: nginx listens on :80 on every address, the registry on :5000,
# tinyproxy on :8888.
SERVICES=(docker-registry nginx containerd podman.socket podman tinyproxy)

stop_services=false
for arg in "$@"; do
    case "$arg" in
        --stop-services) stop_services=true ;;
        *) echo "usage: $0 [--stop-services]" >&2; exit 2 ;;
    esac
done

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$package")
done

stop_system_services() {
    for service in "${SERVICES[@]}"; do
        systemctl disable --now "$service" >/dev/null 2>&1 \
            || invoke-rc.d "$service" stop >/dev/null 2>&1 || true
    done
    # Without an init system: the registry runs as its package's user, nginx has a pid file.
    for pid in $(pgrep -u docker-registry -x docker-registry 2>/dev/null || true); do
        kill "$pid" 2>/dev/null || true
    done
    if [ -s /run/nginx.pid ]; then nginx -s quit 2>/dev/null || true; fi
}

if [ "${#missing[@]}" -eq 0 ]; then
    if $stop_services; then stop_system_services; fi
    exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "make test needs these Debian packages: ${missing[*]}" >&2
    if command -v apt-get >/dev/null 2>&1; then
        echo "install them (and stop the services they start) with:" >&2
        echo "    sudo $here/install-test-deps.sh" >&2
    else
        echo "this is not Debian/Ubuntu; there, this command would install them:" >&2
        echo "    sudo $here/install-test-deps.sh" >&2
        echo "elsewhere install the equivalents of: ${missing[*]}" >&2
    fi
    exit 1
fi

echo "installing test dependencies: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
stop_system_services
