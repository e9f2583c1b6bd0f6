#!/bin/sh
# sudo on a simulated NixOS host (rebuild test bed): testbed/sim/shims.py's sudo_shim in POSIX
# sh, without Python's 40 ms start-up.
#
# Imitates nothing itself: the real sudo(8) runs, but the command keeps the host's PATH and
# SIM_ROOT, which sudo's env_reset (sudoers(5)) would drop. The shim finds where the command
# starts (sudo's options as sudo(8) lists them; -C -D -g -p -R -r -t -T -U -u and their long
# forms take a value) and runs `sudo OPTIONS -- /usr/bin/env PATH=... SIM_ROOT=... [VAR=value
# ...] COMMAND` with /run, /nix/var and /var/lib arguments of the command mapped into SIM_ROOT
# (testbed.sim.host.map_arg). -i, -s and sudo without a command go to the real sudo untouched.
# In the C locale LC_CTYPE=C.UTF-8 is set first, as the Python shim's start-up does (PEP 538).
# When SIM_ROOT is not in the environment and no .sim-root marker is next to the link this was
# executed as, the Python shim (py/sudo next to this script) runs instead.
set -u
real=/usr/bin/sudo
if [ -z "${LC_ALL-}" ]; then
  case ${LC_CTYPE:-${LANG-}} in
    '' | C | POSIX) export LC_CTYPE=C.UTF-8 ;;
  esac
fi

# where the command starts: $opts arguments are sudo's (a "--" that ends them included)
opts=0
shell_mode=
skip=
for a in "$@"; do
  if [ -n "$skip" ]; then
    skip=
    opts=$((opts + 1))
    continue
  fi
  case $a in
    --)
      opts=$((opts + 1))
      break
      ;;
    - | [!-]* | '') break ;;
    --*)
      opts=$((opts + 1))
      case $a in
        *=*) ;;
        --close-from | --chdir | --group | --host | --prompt | --chroot | --role | --type | \
          --command-timeout | --other-user | --user) skip=1 ;;
      esac
      case ${a%%=*} in
        --login | --shell) shell_mode=1 ;;
      esac
      ;;
    *)
      opts=$((opts + 1))
      letters=${a#-}
      while [ -n "$letters" ]; do
        rest=${letters#?}
        ch=${letters%"$rest"}
        letters=$rest
        case $ch in
          i | s) shell_mode=1 ;;
          [CDgpRrtTUu])
            [ -z "$letters" ] && skip=1
            break
            ;;
        esac
      done
      ;;
  esac
done
# a value-taking option last: its value is past the end
[ "$opts" -gt "$#" ] && opts=$#
if [ "$opts" -ge "$#" ] || [ -n "$shell_mode" ]; then
  exec "$real" "$@"
fi

root=${SIM_ROOT-}
if [ -z "$root" ]; then
  case $0 in
    */*) marker=${0%/*}/.sim-root ;;
    *) marker=./.sim-root ;;
  esac
  [ -r "$marker" ] && IFS= read -r root <"$marker"
fi
if [ -z "$root" ]; then
  self=$(/usr/bin/readlink -f -- "$0") || self=$0
  exec "${self%/*}/py/sudo" "$@"
fi

# the command must hold more than VAR=value assignments
k=0
found=
for a in "$@"; do
  k=$((k + 1))
  [ "$k" -gt "$opts" ] || continue
  case ${a%%=*} in
    "$a" | '' | [!A-Za-z_]* | *[!A-Za-z0-9_]*)
      found=1
      break
      ;;
  esac
done
[ -n "$found" ] || exec "$real" "$@"

# rebuild the arguments (rotating them through "$@")
n=$#
k=0
assigning=1
[ "$opts" -eq 0 ] && set -- "$@" -- /usr/bin/env "PATH=${PATH-/usr/bin:/bin}" "SIM_ROOT=$root"
while [ "$k" -lt "$n" ]; do
  a=$1
  shift
  k=$((k + 1))
  if [ "$k" -le "$opts" ]; then
    # sudo's own options; a "--" that ended them is put back below
    if [ "$k" -lt "$opts" ] || [ "$a" != -- ]; then
      set -- "$@" "$a"
    fi
    if [ "$k" -eq "$opts" ]; then
      set -- "$@" -- /usr/bin/env "PATH=${PATH-/usr/bin:/bin}" "SIM_ROOT=$root"
    fi
    continue
  fi
  if [ -n "$assigning" ]; then
    case ${a%%=*} in
      "$a" | '' | [!A-Za-z_]* | *[!A-Za-z0-9_]*) assigning= ;;
      *)
        set -- "$@" "$a"
        continue
        ;;
    esac
  fi
  case $a in
    /run | /run/* | /nix/var | /nix/var/* | /var/lib | /var/lib/*) a=$root$a ;;
    -*=*)
      value=${a#*=}
      case $value in
        /run | /run/* | /nix/var | /nix/var/* | /var/lib | /var/lib/*) a=${a%%=*}=$root$value ;;
      esac
      ;;
  esac
  set -- "$@" "$a"
done
exec "$real" "$@"
