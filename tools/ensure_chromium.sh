#!/bin/sh
# The first step of `make test` (and of `make browser`): the browser check drives Debian's
# `chromium` through Playwright, which never downloads a browser. When it is missing, install
# it with apt if this user can (root, apt-get present); otherwise stop at once, before any
# other step runs, printing the one command that installs it.
# CHROMIUM names the executable to look for (tests set it; default: chromium).
set -eu

CHROMIUM="${CHROMIUM:-chromium}"
if command -v "$CHROMIUM" >/dev/null 2>&1; then
  exit 0
fi
if [ "$CHROMIUM" = chromium ] && [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "chromium is missing: installing Debian's chromium (apt-get install chromium)"
  if apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; then
    exit 0
  fi
  echo "apt-get could not install chromium (see above)." >&2
fi
echo "make test needs Debian's chromium for the browser check. Install it, then run make test" >&2
echo "again:" >&2
if command -v apt-get >/dev/null 2>&1; then
  echo "    sudo sh -c 'apt-get update && apt-get install -y chromium'" >&2
else
  echo "    (no apt-get here) install Chromium and put a 'chromium' executable on PATH" >&2
fi
exit 1
