#!/usr/bin/env bash
# Set up rebuild from a fresh clone and run it: `scripts/setup.sh demo` or `scripts/setup.sh test`.
# Creates .venv, installs the project (and its dev tools for `test`) and the simulated NixOS test
# bed (testbed/, its own distribution: never part of the installed tool), then runs the demo or
# the whole test suite. As root it installs missing Debian packages with apt-get; as a normal
# user it says exactly which ones to install.
set -euo pipefail

usage() {
  echo "usage: scripts/setup.sh demo|test   (demo: invoke demo; test: ruff, mypy, pytest)" >&2
  exit 2
}
[ $# -eq 1 ] || usage
mode=$1
case "$mode" in demo|test) ;; *) usage ;; esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# program:package pairs the demo needs; the tests need a few more.
needs=(/usr/sbin/sshd:openssh-server ssh:openssh-client git:git)
if [ "$mode" = test ]; then
  needs+=(age:age shellcheck:shellcheck ss:iproute2 ip:iproute2 curl:curl sudo:sudo)
fi
missing=()
for pair in "${needs[@]}"; do
  prog=${pair%%:*}
  pkg=${pair#*:}
  if ! command -v "$prog" >/dev/null 2>&1 && [ ! -x "$prog" ]; then
    case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${missing[*]}"
    # Keep the package's own sshd from starting on port 22 during the install.
    policy=/usr/sbin/policy-rc.d
    created_policy=no
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=yes
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$created_policy" = yes ] && rm -f "$policy"
  else
    echo "error: missing Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
    exit 2
  fi
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: rebuild needs Python 3.11 or newer as '$python' (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extra=""
[ "$mode" = test ] && extra="[dev]"
# the deploy tool, and the test bed that the demo and the tests run against (`pip install .`
# alone installs the deploy tool only)
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}" -e ./testbed
# Byte-compile the checkout's own code once: with PYTHONDONTWRITEBYTECODE set (common in
# containers) every `invoke` would otherwise compile rebuild/ again (about 50 ms a start)
.venv/bin/python -m compileall -q rebuild testbed tasks.py >/dev/null

export PATH="$root/.venv/bin:$PATH"
if [ "$mode" = demo ]; then
  exec invoke demo
fi
ruff check .
ruff format --check .
mypy
# 4 workers on any machine: the tests mostly wait (timers, reboots, lost hosts), and each
# brings its own hosts, ports and network namespaces
exec pytest -q -n "${TEST_WORKERS:-4}" --dist worksteal
