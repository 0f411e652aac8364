#!/bin/sh
# dns-01 hook for haproxy-acme-agent: publishes the challenge TXT record with BIND's
# nsupdate (any RFC 2136 server: BIND, Knot, PowerDNS). See docs/dns.md.
#
# Called as:  dns-hook-nsupdate.sh ACTION RECORD VALUE ZONE
#   ACTION  add | remove
#   RECORD  _acme-challenge.www.example.com.  (full name, trailing dot)
#   VALUE   the TXT value
#   ZONE    the [[dns]] zone
# (also in ACME_ACTION, ACME_RECORD, ACME_VALUE, ACME_ZONE, ACME_DOMAIN, and certbot's
# CERTBOT_DOMAIN / CERTBOT_VALIDATION). Exit 0 on success; anything on stderr is reported.
#
# Settings from the environment:
#   NSUPDATE_SERVER    primary server (default 127.0.0.1)
#   NSUPDATE_PORT      its port (default 53)
#   NSUPDATE_KEY_FILE  a BIND key file: key "name" { algorithm hmac-sha256; secret "..."; };
set -eu

action=$1 record=$2 value=$3 zone=$4
server=${NSUPDATE_SERVER:-127.0.0.1}
port=${NSUPDATE_PORT:-53}
keyfile=${NSUPDATE_KEY_FILE:?set NSUPDATE_KEY_FILE to a BIND key file}

case "$action" in
    add) op="update add $record 60 IN TXT \"$value\"" ;;
    remove) op="update delete $record IN TXT \"$value\"" ;;
    *) echo "unknown action $action" >&2; exit 2 ;;
esac

nsupdate -k "$keyfile" -t 10 <<END
server $server $port
zone $zone
$op
send
END
