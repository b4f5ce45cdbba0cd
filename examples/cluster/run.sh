#!/usr/bin/env bash
# Two Caddy instances of one relay sharing NATS JetStream, and a check that
# every event is delivered once, whichever instance took it or delivered it.
#
#   examples/cluster/run.sh            # one NATS node (nats-single.conf)
#   examples/cluster/run.sh cluster    # three NATS nodes, replicas 3
#
# It builds cmd/caddy, nats-server (the version in go.mod) and the stand-in
# service in legacy/, starts them, and sends:
#   - EVENTS (default 200) distinct events with `caddy webhook-relay
#     simulate`, half to each instance at the same time, 20% of sends
#     re-sent to the same instance;
#   - CROSS (default 20) events sent to both instances at once, and again
#     to both once the rest is in: each must be stored once ("accepted" from
#     one instance, "duplicate" with the same event_id from every other
#     answer).
# The stand-in refuses 10% of deliveries with a 503, so retries happen.
# Then it waits until the stand-in has every event, nothing is pending, and
# checks that no event arrived twice. Everything listens on 127.0.0.1 and
# is stopped on exit; logs are kept (and named) when a check fails.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
mode=${1:-single}
events=${EVENTS:-200}
cross=${CROSS:-20}
case $mode in
single | cluster) ;;
*)
	echo "usage: $0 [single|cluster]" >&2
	exit 2
	;;
esac

# The ports of the example's files.
site_a=8081 site_b=8082 admin_a=2021 admin_b=2022 legacy=9099

tmp=$(mktemp -d "${TMPDIR:-/tmp}/webhook-relay-cluster.XXXXXX")
pids=()  # long-running processes, checked while waiting
names=() # their names, for logs
sims=()  # simulate runs, stopped on exit too
cross_ids=()

stop_all() {
	local status=$? i
	if ((status != 0 && status != 130)) && [[ " ${names[*]} " == *" legacy "* ]]; then
		echo "run.sh: the stand-in's counts: $(curl -fsS --max-time 2 "http://127.0.0.1:$legacy/stats" 2>&1)" >&2
	fi
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill "${pids[i]}" 2>/dev/null || true
	done
	for i in "${sims[@]}"; do kill "$i" 2>/dev/null || true; done
	for i in "${pids[@]}" "${sims[@]}"; do wait "$i" 2>/dev/null || true; done
	if ((status != 0 && status != 130)); then
		for i in "${names[@]}"; do
			printf -- '--- last lines of %s\n' "$tmp/$i.log"
			tail -n 20 "$tmp/$i.log" 2>/dev/null || true
		done >&2
		echo "run.sh: logs and data kept in $tmp" >&2
	else
		rm -rf "$tmp"
	fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM

die() {
	echo "run.sh: $*" >&2
	exit 1
}

# start <name> <command...>: runs it in $tmp, its output in $tmp/<name>.log.
start() {
	local name=$1
	shift
	(cd "$tmp" && exec "$@") >"$tmp/$name.log" 2>&1 &
	pids+=("$!")
	names+=("$name")
}

check_alive() {
	local i
	for i in "${!pids[@]}"; do
		kill -0 "${pids[i]}" 2>/dev/null || die "${names[i]} exited (see its log below)"
	done
}

# wait_until <what> <seconds> <command...>: polls the command until it
# succeeds, failing after the deadline or when a process has died.
wait_until() {
	local what=$1 seconds=$2
	local deadline=$((SECONDS + seconds))
	shift 2
	until "$@"; do
		((SECONDS < deadline)) || die "$what: not within ${seconds}s"
		check_alive
		sleep 0.2
	done
}

nats_healthy() { curl -fs -o /dev/null "http://127.0.0.1:$1/healthz"; }

metrics() { curl -fs "http://127.0.0.1:$1/metrics"; }

# metric <admin port> <name{labels}>: the sample's value, 0 when absent,
# -1 when the metrics cannot be read.
metric() {
	local m
	m=$(metrics "$1") || {
		echo -1
		return 1
	}
	awk -v s="$2" '$1 == s { v = $2 } END { print v + 0 }' <<<"$m"
}

store_up() { [[ $(metric "$1" 'caddy_webhook_relay_store_up{relay="okhi"}') == 1 ]]; }

# stat <field>: a number from the stand-in's /stats, -1 when it does not
# answer.
stat() {
	local s v
	s=$(curl -fs "http://127.0.0.1:$legacy/stats") || {
		echo -1
		return 1
	}
	v=$(sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" <<<"$s")
	echo "${v:--1}"
}

# post <port> <body>: one OkHi-style POST; prints "<http status> <status> <event_id>".
post() {
	local out
	out=$(curl -sS --max-time 15 -w ' %{http_code}' \
		-H "okhi-authorization: $OKHI_WEBHOOK_SECRET" -H 'Content-Type: application/json' \
		--data-binary "$2" "http://127.0.0.1:$1/") || out="curl-failed 000"
	printf '%s %s %s\n' "${out##* }" \
		"$(sed -n 's/.*"status":"\([a-z]*\)".*/\1/p' <<<"$out")" \
		"$(sed -n 's/.*"event_id":"\([0-9a-f]*\)".*/\1/p' <<<"$out")"
}

cross_body() {
	printf '{"v2":{"address_verification_id":"cross-%s-%d","verification_status":"verified","verification_mode":"first_time","user_id":"u%d","location_id":"l%d"}}' \
		"$run_id" "$1" "$1" "$1"
}

echo "building caddy, nats-server and the stand-in into $tmp"
cd "$root"
go build -o "$tmp/caddy" ./cmd/caddy
# nats-server at the version in go.mod, from the module cache; a checkout
# whose go.mod lacks it fetches the pinned release.
go build -o "$tmp/nats-server" github.com/nats-io/nats-server/v2 2>/dev/null ||
	GOBIN="$tmp" go install github.com/nats-io/nats-server/v2@v2.15.2
go build -o "$tmp/legacy" ./examples/cluster/legacy

if [[ $mode == single ]]; then
	start nats "$tmp/nats-server" -c "$here/nats-single.conf"
	wait_until "nats-server answering on :8222/healthz" 30 nats_healthy 8222
	export NATS_URL=nats://127.0.0.1:4222 NATS_REPLICAS=1
else
	for n in 1 2 3; do
		start "nats-$n" "$tmp/nats-server" -c "$here/nats-cluster-$n.conf"
	done
	for port in 8222 8223 8224; do
		wait_until "nats-server answering on :$port/healthz" 60 nats_healthy "$port"
	done
	export NATS_URL=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 NATS_REPLICAS=3
fi

start legacy "$tmp/legacy" -addr "127.0.0.1:$legacy" -fail 0.1
wait_until "stand-in answering on :$legacy" 30 curl -fs -o /dev/null "http://127.0.0.1:$legacy/stats"

OKHI_WEBHOOK_SECRET=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export OKHI_WEBHOOK_SECRET
for x in a b; do
	# Each instance its own config and data directories (autosave.json).
	start "caddy-$x" env XDG_CONFIG_HOME="$tmp/$x/config" XDG_DATA_HOME="$tmp/$x/data" \
		"$tmp/caddy" run --adapter caddyfile --config "$here/Caddyfile.$x"
done
wait_until "caddy A with store_up 1" 60 store_up "$admin_a"
wait_until "caddy B with store_up 1" 60 store_up "$admin_b"
echo "NATS ($mode), caddy A on :$site_a, caddy B on :$site_b, stand-in on :$legacy: up"

half=$((events / 2))
run_id=$(date +%s)-$$
for x in a b; do
	if [[ $x == a ]]; then port=$site_a n=$half; else port=$site_b n=$((events - half)); fi
	"$tmp/caddy" webhook-relay simulate --url "http://127.0.0.1:$port/" \
		--header "okhi-authorization: $OKHI_WEBHOOK_SECRET" \
		--events "$n" --rate 50 --duplicates 0.2 >"$tmp/simulate-$x.log" 2>&1 &
	sims+=("$!")
done

# The same event at both instances at once: stored once.
for ((i = 1; i <= cross; i++)); do
	body=$(cross_body "$i")
	post "$site_a" "$body" >"$tmp/cross-a" &
	a=$!
	post "$site_b" "$body" >"$tmp/cross-b" &
	b=$!
	wait "$a" "$b"
	read -r code_a status_a id_a <"$tmp/cross-a"
	read -r code_b status_b id_b <"$tmp/cross-b"
	pair="$status_a,$status_b"
	if [[ $code_a != 200 || $code_b != 200 ]] ||
		[[ $pair != accepted,duplicate && $pair != duplicate,accepted ]] ||
		[[ -z $id_a || $id_a != "$id_b" ]]; then
		die "cross event $i sent to both at once: A answered $code_a $status_a $id_a, B $code_b $status_b $id_b (want one accepted, one duplicate, one event_id)"
	fi
	cross_ids[i]=$id_a
done

sim_names=(a b)
for i in "${!sims[@]}"; do
	x=${sim_names[i]}
	wait "${sims[i]}" || {
		cat "$tmp/simulate-$x.log" >&2
		die "simulate against caddy ${x^^} failed"
	}
	echo "simulate against caddy ${x^^}:"
	sed 's/^/  /' "$tmp/simulate-$x.log"
done
sims=()

# The same events again, to each instance, once everything else is in.
for ((i = 1; i <= cross; i++)); do
	body=$(cross_body "$i")
	for port in "$site_b" "$site_a"; do
		read -r code status id < <(post "$port" "$body")
		[[ $code == 200 && $status == duplicate && $id == "${cross_ids[i]}" ]] ||
			die "cross event $i re-sent to :$port: $code $status $id (want 200 duplicate ${cross_ids[i]})"
	done
done
echo "$cross events sent to both instances: each accepted once, every other answer duplicate"

want=$((events + cross))
seen_all() { (($(stat distinct) >= want)); }
wait_until "the stand-in seeing $want distinct events" 120 seen_all
pending='caddy_webhook_relay_pending{relay="okhi",target="legacy"}'
none_pending() { (($(metric "$admin_a" "$pending") == 0 && $(metric "$admin_b" "$pending") == 0)); }
wait_until "pending 0 on both instances" 60 none_pending

distinct=$(stat distinct) duplicates=$(stat duplicates) requests=$(stat requests) failed=$(stat failed)
accepted_a=$(metric "$admin_a" 'caddy_webhook_relay_received_total{relay="okhi",result="accepted"}')
accepted_b=$(metric "$admin_b" 'caddy_webhook_relay_received_total{relay="okhi",result="accepted"}')
delivered='caddy_webhook_relay_deliveries_total{relay="okhi",result="delivered",target="legacy"}'
delivered_a=$(metric "$admin_a" "$delivered")
delivered_b=$(metric "$admin_b" "$delivered")
echo "stand-in: $requests requests, $failed refused with 503, $distinct distinct events, $duplicates delivered twice"
echo "accepted: $accepted_a by A, $accepted_b by B; delivered: $delivered_a by A, $delivered_b by B"

((distinct == want)) || die "the stand-in saw $distinct distinct events, want $want"
((duplicates == 0)) || die "$duplicates deliveries of an event the stand-in already had"
((accepted_a + accepted_b == want)) || die "received_total{result=\"accepted\"} sums to $((accepted_a + accepted_b)) over the instances, want $want"
((delivered_a + delivered_b == want)) || die "deliveries_total{result=\"delivered\"} sums to $((delivered_a + delivered_b)) over the instances, want $want"
echo "$want events, delivered once each: OK"
