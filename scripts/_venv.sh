# Sourced by scripts/test and scripts/demo: makes .venv (or $ORDERHOOKS_VENV)
# and installs the project with its test tools, again whenever the
# dependency files change.
VENV=${ORDERHOOKS_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PYTHON" -m venv "$VENV" || exit 1
fi
stamp="$VENV/.orderhooks-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "==> installing flask-orderhooks and its test tools into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" || exit 1
    rm -f "$VENV"/.orderhooks-*
    touch "$stamp"
fi
