# Sourced by the scripts: make .venv (once) and install a requirements file (when it changed).
# Usage: ensure_venv requirements.txt
ensure_venv() {
  local requirements=$1 python=${PYTHON:-python3}
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "imagegen needs Python 3.10 or newer (Cloud Functions runs 3.12); set PYTHON=python3.12" >&2
    exit 1
  fi
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  local stamp=.venv/.installed-$(basename "$requirements")
  local wanted
  wanted=$(cat "$requirements" requirements.txt | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
    echo "$wanted" >"$stamp"
  fi
}
