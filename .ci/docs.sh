#!/usr/bin/env bash
# Documentation: build the site with `mkdocs build --strict` (a broken link, a missing anchor or an unknown
# API name fails) and check three pages in headless Chromium (docs/check_site.py). Screenshots go to
# build/screenshots.
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || python -m pip install -q -e ".[docs]"
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
python docs/check_site.py --out build/screenshots
