#!/usr/bin/env bash
# A headless browser for tests/test_dashboard_browser.py: Debian's chromium and its matching
# chromedriver (the test drives them with selenium, which comes with the `test` extra).
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium and chromedriver already installed"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
packages=(chromium chromium-driver)
apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && apt-get install -y -q "${packages[@]}" >/dev/null; }
/usr/bin/chromium --version
/usr/bin/chromedriver --version
