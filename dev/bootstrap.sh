# Sourced by dev/demo, dev/test and dev/bench: make sure a venv holds this project and its test tools,
# installed with the pinned versions in dev/constraints/<Airflow minor>.txt so every run resolves alike.
# The newest minor lives in .venv; AIRFLOW_MINOR (set by dev/test --airflow) picks another, in .venv-X.Y.
# Installs uv (with pip) when missing; reinstalls only when pyproject.toml or the constraints changed.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

# The supported minors are the constraints files present (dev/constraints/generate makes them).
SUPPORTED_MINORS="$(cd "$REPO_ROOT/dev/constraints" && ls -- *.txt | sed 's/\.txt$//' | sort -V | xargs)"
NEWEST_MINOR="${SUPPORTED_MINORS##* }"
AIRFLOW_MINOR="${AIRFLOW_MINOR:-$NEWEST_MINOR}"
case " $SUPPORTED_MINORS " in
    *" $AIRFLOW_MINOR "*) ;;
    *) echo "unknown Airflow minor '$AIRFLOW_MINOR': supported are ${SUPPORTED_MINORS// /, }" >&2; exit 2 ;;
esac
CONSTRAINTS="$REPO_ROOT/dev/constraints/$AIRFLOW_MINOR.txt"
VENV="$REPO_ROOT/.venv"
[ "$AIRFLOW_MINOR" = "$NEWEST_MINOR" ] || VENV="$REPO_ROOT/.venv-$AIRFLOW_MINOR"

if ! command -v uv >/dev/null 2>&1; then
    echo "==> installing uv" >&2
    "$PYTHON" -m pip install --quiet uv
fi
UV="$(command -v uv || echo "$("$PYTHON" -m site --user-base)/bin/uv")"

stamp="$VENV/.installed-$(cat "$REPO_ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    # A fresh venv each time the pins change: installing over an old one would keep what they dropped.
    echo "==> creating $VENV" >&2
    "$UV" venv --quiet --clear --python "$PYTHON" "$VENV"
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
        echo "==> warning: dev/constraints are resolved for Python 3.11; set PYTHON=python3.11" >&2
    echo "==> installing airflow-remote-exec with Airflow $AIRFLOW_MINOR constraints into $VENV" \
        "(first run takes a minute)" >&2
    "$UV" pip install --quiet --python "$VENV/bin/python" -e "$REPO_ROOT[test,bench]" -c "$CONSTRAINTS"
    rm -f "$VENV"/.installed-* && touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
