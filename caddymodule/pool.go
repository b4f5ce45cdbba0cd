package caddymodule

import (
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

// engines holds every live engine, keyed by its store's
// StorageBackend.PoolKey ("bolt:<abs path>", "memory:<name>",
// "nats:<urls>|<stream>|<digest of the other settings>"), so that it
// outlives reloads: a new config takes the engine the old one used, and
// the last config to let go closes it. A store file is never opened
// twice, and a NATS connection is kept until its settings change.
var engines = caddy.NewUsagePool()

// storeLockTimeout bounds the wait for a store file held by another
// process; bbolt would wait forever.
const storeLockTimeout = 2 * time.Second

type pooledEngine struct {
	*relay.Engine
}

// Destruct closes the engine when no config uses it any more.
func (p *pooledEngine) Destruct() error { return p.Close() }

// liveEngine finds the open engine named name.
func liveEngine(name string) *relay.Engine {
	var found *relay.Engine
	engines.Range(func(_, v any) bool {
		e := v.(*pooledEngine).Engine
		if e.Name() == name {
			found = e
			if e.IsOpen() {
				return false
			}
		}
		return true
	})
	return found
}

func timeDuration(d caddy.Duration) time.Duration { return time.Duration(d) }
