#!/bin/sh
# Build dist/chat_server.pyz and dist/chat_client.pyz: each one file, runnable with
# "python3 chat_server.pyz" (or ./chat_server.pyz) on Python 3.8 or newer, nothing to install.
#
#   sh build.sh            -> dist/
#   sh build.sh OUTDIR     -> OUTDIR/
#   PYTHON=python3.8 sh build.sh
#
# Reproducible: the same commit gives byte-identical archives (fixed timestamps, order and
# permissions inside the zip), so the SHA-256 printed here can be checked on the target machine.
set -eu

out=${1:-dist}
case $out in
  /*) ;;
  *) out=$(pwd)/$out ;;
esac
cd "$(dirname "$0")"

is_python38() {
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 8))' >/dev/null 2>&1
}

if [ -n "${PYTHON:-}" ]; then
  is_python38 "$PYTHON" || { echo "build.sh: PYTHON=$PYTHON is not Python 3.8 or newer" >&2; exit 1; }
else
  for candidate in python3 python; do
    if is_python38 "$candidate"; then PYTHON=$candidate; break; fi
  done
  if [ -z "${PYTHON:-}" ]; then
    echo "build.sh: Python 3.8 or newer not found (tried python3, python); set PYTHON=..." >&2
    exit 1
  fi
fi

# The builder below is also what build.bat runs: it reads the lines between the markers.
"$PYTHON" - "$out" <<'PYTHON_BUILDER'
# BEGIN BUILDER
import hashlib, io, os, sys, zipapp, zipfile

FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no build-time stamps
INTERPRETER = "/usr/bin/env python3"


def archive_bytes(module):
    """A zip holding just the module and an entry point, the same bytes on every build."""
    with open(module + ".py", "rb") as f:
        source = f.read()
    entry = ("import sys\nimport %s\nsys.exit(%s.main())\n" % (module, module)).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in ((module + ".py", source), ("__main__.py", entry)):
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3               # the same on Windows and POSIX
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    buffer.seek(0)
    return buffer


out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
for module in ("chat_server", "chat_client"):
    target = os.path.join(out_dir, module + ".pyz")
    # zipapp adds the #! line and, on POSIX, the owner's executable bit only: everyone may
    # run ./chat_server.pyz, as with any installed program.
    zipapp.create_archive(archive_bytes(module), target, interpreter=INTERPRETER)
    if os.name == "posix":
        os.chmod(target, 0o755)
    with open(target, "rb") as f:
        data = f.read()
    print("built %s  %d bytes  sha256 %s" % (target, len(data), hashlib.sha256(data).hexdigest()))
# END BUILDER
PYTHON_BUILDER
