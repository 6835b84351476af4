# Sourced by the scripts/install-*.sh that apt-get install Debian packages whose maintainer scripts would
# start a service (prometheus, nginx): fedtune starts these programs itself, so the package's own service
# must never start. `block_service_starts` installs a policy-rc.d (invoke-rc.d honours it) for the rest of
# the calling script and removes it on exit, unless one was there already. Needs $SUDO set ("" or sudo).
block_service_starts() {
  _policy=/usr/sbin/policy-rc.d
  _created_policy=0
  if [ ! -e "$_policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$_policy" >/dev/null
    $SUDO chmod 0755 "$_policy"
    _created_policy=1
  fi
  trap '_unblock_service_starts' EXIT
}

_unblock_service_starts() {
  if [ "${_created_policy:-0}" = 1 ]; then $SUDO rm -f "$_policy"; fi
}
