#!/usr/bin/env bash
# Idempotent installer for a fresh Debian bookworm machine, run as root from a clone.
#
# Each step checks first and changes only what is missing, printing one line per change;
# a run that changes nothing prints "install: nothing to do".
# Later features add their Debian packages to APT_PACKAGES and their host set-up as a step.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

# Debian packages the project needs. Add to this list, one per line. Use real package names,
# not virtual ones: dpkg-query never reports a virtual package as installed.
APT_PACKAGES=(
    python3
    python3-venv
    python3-pip
    python3-dev
    gcc
    make
    git
    iproute2      # the testbed (src/l7gate/testing/testbed.py): ip netns, veths
    iputils-ping  # the testbed's reachability probes
    curl          # pods run curl in the testbed, as the seed's frontend does
    # the kernel datapath (src/l7gate/redirect_bpf): bcc compiles the tc programs at run time
    python3-bpfcc
    bpfcc-tools
    bpftool
    clang
    iptables      # the fallback redirect when bcc cannot compile
    nftables      # bench/_datapath_world.py reads the nft tables its iptables chains land in
    linux-headers-amd64
    wrk           # bench/bench_envoy.py: load through the agent's Envoy
    tcpdump       # link captures that prove encryption in transit (tests, make demo)
    nghttp2-client  # h2load: gRPC-shaped HTTP/2 load in bench/bench_grpc.py
    etcd-server   # the kvstore's etcd backend: tests and bench/bench_etcd.py start their own
    etcd-client   # etcdctl, for inspecting a cluster mesh etcd by hand
    dnsmasq-base  # the testbed's DNS server (cluster resolver and "the internet") for toFQDNs; no system service
    dpkg          # dpkg-query: this script's own check for what is already installed
    debianutils   # which, run-parts: the maintainer scripts of the packages above call them
)

VENV="$ROOT/.venv"
STAMP="$VENV/.l7gate-install-stamp"
CHANGED=0

say() {
    echo "install: $*"
    CHANGED=1
}

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install: $1 needs root (run as root, or install them yourself): ${*:2}" >&2
        exit 1
    fi
}

install_apt_packages() {
    local missing=() pkg status
    for pkg in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [ "$status" = "installed" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    need_root "installing Debian packages" "${missing[@]}"
    export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes
    say "apt-get update (missing: ${missing[*]})"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "installed Debian packages: ${missing[*]}"
}

# The system interpreter, not whatever python3 is first on PATH (a dev box may have pyenv).
pick_python() {
    local cand
    for cand in /usr/bin/python3 python3; do
        if command -v "$cand" >/dev/null 2>&1 &&
            "$cand" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$cand"
            return 0
        fi
    done
    echo "install: no Python 3.11+ with venv found" >&2
    exit 1
}

make_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        return 0
    fi
    local py
    py=$(pick_python)
    if [ -e "$VENV" ]; then
        say "removing unusable virtualenv $VENV"
        rm -rf "$VENV"
    fi
    "$py" -m venv "$VENV"
    say "created virtualenv .venv with $py ($("$py" -V 2>&1))"
}

# pip runs again only when pyproject.toml changed since the last successful install
# (or the project is no longer importable from the venv).
install_project() {
    local want have=""
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    [ -f "$STAMP" ] && have=$(cat "$STAMP")
    # The project's own bytecode, written now (cheap when current): an editable install has
    # none, and with PYTHONDONTWRITEBYTECODE set (as on the CI machines) every agent, test
    # subprocess and CLI call compiled the whole package again, ~0.4 s per start here.
    "$VENV/bin/python" -m compileall -q -j 0 src/l7gate >/dev/null || true
    if [ "$want" = "$have" ] && "$VENV/bin/python" -c 'import l7gate' 2>/dev/null; then
        return 0
    fi
    local log="$VENV/pip-install.log"
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[dev]' >"$log" 2>&1; then
        cat "$log" >&2
        echo "install: pip install -e '.[dev]' failed (log above, also in $log)" >&2
        exit 1
    fi
    echo "$want" >"$STAMP"
    say "pip install -e '.[dev]' into .venv ($([ -n "$have" ] && echo "pyproject.toml changed" || echo "first install"))"
}

# bcc needs the running kernel's headers at /lib/modules/$(uname -r)/build. This kernel ships
# none; Debian's linux-headers-amd64 works when linked there (FIELD-NOTES). Also bpffs at
# /sys/fs/bpf, where the datapath pins its maps. Root only; skipped (with a note) otherwise.
setup_datapath_host() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install: not root: skipping kernel headers link and bpffs mount (kernel datapath needs root)"
        return 0
    fi
    local kver mods hdr common
    kver=$(uname -r)
    mods="/lib/modules/$kver"
    if [ ! -e "$mods/build/include" ]; then
        hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
        common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$hdr" ] && [ -n "$common" ]; then
            mkdir -p "$mods"
            ln -sfn "$hdr" "$mods/build"
            ln -sfn "$common" "$mods/source"
            say "linked kernel headers for $kver: $mods/build -> $hdr, $mods/source -> $common"
        else
            echo "install: no kernel headers under /usr/src: the kernel datapath will fall back to iptables" >&2
        fi
    fi
    if ! mountpoint -q /sys/fs/bpf; then
        mkdir -p /sys/fs/bpf
        mount -t bpf bpf /sys/fs/bpf
        say "mounted bpffs at /sys/fs/bpf"
    fi
}

install_apt_packages
make_venv
install_project
setup_datapath_host

if [ "$CHANGED" -eq 0 ]; then
    echo "install: nothing to do"
fi
