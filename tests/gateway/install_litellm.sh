#!/usr/bin/env bash
# Install the LiteLLM proxy into a virtualenv of its own, for tests/test_litellm_gateway.py.
#
# Never into the project's environment: LiteLLM pins openai and fastapi versions that clash with ours.
# Idempotent: an existing venv with the pinned version is kept. 1.107.0 was a compromised release and
# is refused whatever is asked.
#
#   GEMBATCH_LITELLM_VENV     where the venv goes (default: ~/.cache/gembatch-litellm)
#   GEMBATCH_LITELLM_VERSION  the version (default below)
#   GEMBATCH_LITELLM_PYTHON   the interpreter to build it from (default: the project's .venv, else python3)
set -euo pipefail

VERSION="${GEMBATCH_LITELLM_VERSION:-1.106.12}"
VENV="${GEMBATCH_LITELLM_VENV:-$HOME/.cache/gembatch-litellm}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [ "$VERSION" = "1.107.0" ]; then
    echo "install_litellm.sh: refusing litellm 1.107.0 (a compromised release); pick another version" >&2
    exit 1
fi

if [ -x "$VENV/bin/litellm" ] && [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null)" = "$VERSION" ]; then
    echo "litellm $VERSION already installed in $VENV"
    exit 0
fi

PYTHON="${GEMBATCH_LITELLM_PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then
        PYTHON="$(readlink -f "$REPO/.venv/bin/python")"
    else
        PYTHON="$(command -v python3)"
    fi
fi

rm -rf "$VENV"
uv venv --quiet --python "$PYTHON" "$VENV"
uv pip install --quiet --python "$VENV/bin/python" "litellm[proxy]==$VERSION"
echo "litellm $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))') installed in $VENV"
