# Sourced by dev/demo, dev/test and dev/bench: make sure .venv holds this project and its test tools.
# Installs uv (with pip) when missing; reinstalls only when pyproject.toml changed.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if ! command -v uv >/dev/null 2>&1; then
    echo "==> installing uv" >&2
    "$PYTHON" -m pip install --quiet uv
fi
UV="$(command -v uv || echo "$("$PYTHON" -m site --user-base)/bin/uv")"

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV" >&2
    "$UV" venv --quiet --python "$PYTHON" "$VENV"
fi

stamp="$VENV/.installed-$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "==> installing airflow-remote-exec and its dependencies into $VENV (first run takes a minute)" >&2
    "$UV" pip install --quiet --python "$VENV/bin/python" -e "$REPO_ROOT[test,bench]"
    rm -f "$VENV"/.installed-* && touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
