#!/usr/bin/env bash
# install.sh: install selfheal on this host, or remove it.
#
#   sudo ./install.sh                 validate services.conf, then install and start watching
#   sudo ./install.sh --uninstall     remove what was installed; services keep running
#   sudo ./install.sh --uninstall --purge   ... and the config, history and queued mail
#   ./install.sh --help
#
# Environment: PREFIX (default /usr/local), DESTDIR (stage into a directory for
# packaging; systemd is not told), CONFIG (default: services.conf beside this script).
#
# All the work is done by `selfheal.py install`, the same code a new host runs with
# only the single file: this script checks what it needs and hands over.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${PREFIX:-/usr/local}"
destdir="${DESTDIR:-}"
config="${CONFIG:-$here/services.conf}"
python="${PYTHON:-python3}"
args=()

usage() {
    sed -n '2,13s/^# \{0,1\}//p' "$0"
}

for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --uninstall|--purge) args+=("$arg") ;;
        *) echo "install.sh: unknown option: $arg (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: needs root: sudo $0 $*" >&2
    exit 1
fi
if ! command -v "$python" >/dev/null 2>&1; then
    echo "install.sh: $python not found; selfheal needs Python 3.9 or newer" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
    echo "install.sh: selfheal needs Python 3.9 or newer; $python is $("$python" -V 2>&1)" >&2
    exit 1
fi
if [ -z "$destdir" ] && [ ! -d /run/systemd/system ]; then
    echo "install.sh: this host is not running systemd (no /run/systemd/system)" >&2
    exit 1
fi

exec "$python" "$here/selfheal.py" install --config "$config" --prefix "$prefix" \
    --destdir "$destdir" ${args[@]+"${args[@]}"}
