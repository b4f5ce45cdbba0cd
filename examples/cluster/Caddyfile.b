# Instance B of one relay run by two Caddy instances that share a NATS
# JetStream (Caddyfile.a is the other one; in production, one per
# machine behind a load balancer, with the same file).
#
#   OKHI_WEBHOOK_SECRET=... caddy run --config Caddyfile.b
#
# run.sh starts both against nats-single.conf (or the three
# nats-cluster-*.conf with NATS_URL and NATS_REPLICAS set, see below) and
# the stand-in service in legacy/, and checks that each event is delivered
# once.
{
	# Each instance on this machine needs its own admin address; the
	# relay's routes, its metrics and its state are served here.
	admin 127.0.0.1:2022
}

http://127.0.0.1:8082 {
	bind 127.0.0.1

	# The relay's name, its store URL(s) and its stream must be the same
	# on every instance: together they are the relay. Settings that do not
	# change what is stored (a forwarded header, a timeout) may differ.
	webhook_relay okhi {
		auth_header okhi-authorization {env.OKHI_WEBHOOK_SECRET}

		# {$VAR:default} is replaced when the Caddyfile is adapted. The
		# defaults are one node (nats-single.conf); for the three-node
		# cluster: NATS_URL=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
		# and NATS_REPLICAS=3.
		storage nats {$NATS_URL:nats://127.0.0.1:4222} {
			# The default for relay okhi, spelled out: every instance
			# names the same one.
			stream WEBHOOK_RELAY_OKHI
			# 1 on one node; 3 on a cluster, so that JetStream acks a
			# write once two of three nodes have it.
			replicas {$NATS_REPLICAS:1}
			# How long intake waits for JetStream's acknowledgement
			# before it answers 503 + Retry-After (OkHi waits 15 s).
			timeout 2s
			# The credentials of a real NATS: one of
			#   creds /etc/caddy/relay.creds
			#   token {file./run/secrets/nats-token}
			#   user relay {env.NATS_PASSWORD}
			# (creds names a file; {env.X} and {file./path} are resolved
			# when the config loads, and never logged.)
		}

		# The stand-in legacy service (legacy/main.go), which counts
		# deliveries by Idempotency-Key. Either instance may deliver an
		# event, whichever accepted it.
		forward legacy http://127.0.0.1:9099/okhi {
			timeout 5s
			backoff 200ms 5s
		}
	}
}
