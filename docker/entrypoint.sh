#!/bin/sh
# Entrypoint of the retrainer image: run as whoever owns the mounted /data folder.
#
# The container starts as root. When /data belongs to another user (a host folder owned by
# uid 4242, say), retrainer runs as that uid/gid, so what it writes there belongs to that
# host user; when /data belongs to root (as on many CI runners), it stays root. The cache
# volume is handed to the same user when it is still the image's own (a fresh named or
# anonymous volume). RETRAINER_KEEP_ROOT=1 keeps root; `docker run --user UID` skips all this.
set -eu

data=${RETRAINER_DATA_DIR:-/data}
cache=${RETRAINER_CACHE_DIR:-/cache}
image_uid=1000   # the owner of /data and /cache in the image (Dockerfile)

if [ "$(id -u)" = 0 ] && [ -z "${RETRAINER_KEEP_ROOT:-}" ] && [ -d "$data" ]; then
    uid=$(stat -c %u "$data")
    gid=$(stat -c %g "$data")
    if [ "$uid" != 0 ]; then
        if [ -d "$cache" ] && [ "$(stat -c %u "$cache")" = "$image_uid" ] \
                && [ "$uid" != "$image_uid" ]; then
            chown -R "$uid:$gid" "$cache"
        fi
        # An arbitrary uid has no home in the image: give it a writable one.
        if ! setpriv --reuid="$uid" --regid="$gid" --clear-groups test -w "${HOME:-/}"; then
            HOME=/tmp/retrainer-home
            mkdir -p "$HOME"
            chown "$uid:$gid" "$HOME"
            export HOME
        fi
        exec setpriv --reuid="$uid" --regid="$gid" --clear-groups retrainer "$@"
    fi
fi
exec retrainer "$@"
