#!/bin/sh
# readlink, mkdir, rm, rmdir, cat, tee, ls, tail and flock on a simulated NixOS host (rebuild
# test bed): testbed/sim/shims.py's path_shim in POSIX sh, without Python's 40 ms start-up.
#
# Imitates nothing itself: it runs the real program (coreutils; util-linux's flock) from
# /usr/bin or /bin with the host's paths mapped. An argument /run, /nix/var or /var/lib (or
# below them, or --option=PATH) becomes $SIM_ROOT/run... (testbed.sim.host.map_arg); for cat,
# /etc/ssh/ssh_host_*_key.pub too (the host's public keys). $SIM_ROOT in front of those paths
# is taken out again (testbed.sim.host.unmap_text) of what readlink and ls print and of every
# error message, which is written after the program ended. The exit code is the program's; a
# program killed by a signal kills the shim with it. In the C locale LC_CTYPE=C.UTF-8 is set,
# as the Python shim's start-up does (PEP 538), so messages quote ‘as before’.
#
# The program is the name this script was executed as (a link in the host's PATH). When
# SIM_ROOT is not in the environment and no .sim-root marker is next to that link, or the
# output may hold NUL bytes (readlink -z, ls --zero), the Python shim (py/NAME next to this
# script) runs instead.
set -u
name=${0##*/}
root=${SIM_ROOT-}
if [ -z "$root" ]; then
  case $0 in
    */*) marker=${0%/*}/.sim-root ;;
    *) marker=./.sim-root ;;
  esac
  [ -r "$marker" ] && IFS= read -r root <"$marker"
fi

python_shim() {
  self=$(/usr/bin/readlink -f -- "$0") || self=$0
  [ -z "$root" ] || [ -n "${SIM_ROOT-}" ] || export SIM_ROOT="$root"
  exec "${self%/*}/py/$name" "$@"
}

[ -n "$root" ] || python_shim "$@"
case $name in
  readlink | ls)
    for a in "$@"; do
      case $a in
        --) break ;;
        --z*) python_shim "$@" ;;
        --*) ;;
        -*z*) python_shim "$@" ;;
      esac
    done
    ;;
esac

if [ -x "/usr/bin/$name" ]; then
  bindir=/usr/bin
elif [ -x "/bin/$name" ]; then
  bindir=/bin
else
  printf '%s: %s: not found in /usr/bin or /bin\n' "$name" "$name" >&2
  exit 1
fi
if [ -z "${LC_ALL-}" ]; then
  case ${LC_CTYPE:-${LANG-}} in
    '' | C | POSIX) export LC_CTYPE=C.UTF-8 ;;
  esac
fi

# map the arguments (rotating them through "$@")
n=$#
while [ "$n" -gt 0 ]; do
  a=$1
  shift
  n=$((n - 1))
  case $a in
    /run | /run/* | /nix/var | /nix/var/* | /var/lib | /var/lib/*) a=$root$a ;;
    # the host's boot id (testbed.sim.host.MAPPED_FILES): new at every simulated reboot
    /proc/sys/kernel/random/boot_id) a=$root$a ;;
    -*=*)
      value=${a#*=}
      case $value in
        /run | /run/* | /nix/var | /nix/var/* | /var/lib | /var/lib/*) a=${a%%=*}=$root$value ;;
      esac
      ;;
    /etc/ssh/ssh_host_*_key.pub)
      kind=${a#/etc/ssh/ssh_host_}
      kind=${kind%_key.pub}
      if [ "$name" = cat ]; then
        case $kind in
          '' | *[!a-z0-9]*) ;;
          *) a=$root$a ;;
        esac
      fi
      ;;
  esac
  set -- "$@" "$a"
done

# unmap TEXT: TEXT without $SIM_ROOT in front of /run, /nix/var and /var/lib, in $unmapped
unmap() {
  rest=$1
  unmapped=
  while :; do
    case $rest in
      *"$root"*) ;;
      *) break ;;
    esac
    unmapped=$unmapped${rest%%"$root"*}
    rest=${rest#*"$root"}
    case $rest in
      /run | /run[!A-Za-z0-9_]* | /nix/var | /nix/var[!A-Za-z0-9_]*) ;;
      /var/lib | /var/lib[!A-Za-z0-9_]*) ;;
      *)
        # not a mapped path: keep the first character, look again from the next one
        rest=${root#?}$rest
        unmapped=$unmapped${root%"${root#?}"}
        ;;
    esac
  done
  unmapped=$unmapped$rest
}

# run it: stderr captured (and stdout for readlink and ls), then shown unmapped; the trailing x
# keeps trailing newlines through $(...). Coreutils name themselves by argv[0] in messages, so
# they run as NAME with PATH=$bindir (none of them runs another program); flock runs a command
# with the host's PATH and names itself by its base name, so it runs as $bindir/flock.
exec 3>&1
case $name in
  flock)
    err=$("$bindir/$name" "$@" 2>&1 1>&3 3>&-; rc=$?; printf x; exit "$rc")
    ;;
  readlink | ls)
    err=$(
      exec 4>&1
      out=$(PATH=$bindir "$name" "$@" 2>&4 3>&- 4>&-; rc=$?; printf x; exit "$rc")
      rc=$?
      out=${out%x}
      case $out in
        *"$root"*) unmap "$out" && out=$unmapped ;;
      esac
      printf '%s' "$out" >&3
      printf x
      exit "$rc"
    )
    ;;
  *)
    err=$(PATH=$bindir "$name" "$@" 2>&1 1>&3 3>&-; rc=$?; printf x; exit "$rc")
    ;;
esac
rc=$?
exec 3>&-
err=${err%x}
if [ -n "$err" ]; then
  case $err in
    *"$root"*) unmap "$err" && err=$unmapped ;;
  esac
  printf '%s' "$err" >&2
fi
if [ "$rc" -gt 128 ]; then
  kill -"$((rc - 128))" "$$" 2>/dev/null
fi
exit "$rc"
