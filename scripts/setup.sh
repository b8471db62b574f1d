#!/usr/bin/env bash
# Idempotent set-up: system packages, a virtual environment in .venv, the project
# installed in it with the versions pinned in constraints.txt. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist)
PYTHON=${PYTHON:-python3}
VENV=.venv

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing system packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the pins or the project's metadata change.
stamp="$VENV/.greedy-cli-installed"
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing Python packages (pinned in constraints.txt)"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[test]'
    # The tests read the sample photographs foolbox ships; none of its code is used.
    "$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt foolbox
    echo "$want" > "$stamp"
fi
"$VENV/bin/greedy-cli" --help >/dev/null
echo "setup: ready ($VENV/bin/greedy-cli)"
