package caddymodule

import (
	"fmt"

	"github.com/caddyserver/caddy/v2"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

const appID = "webhook_relay"

func init() {
	caddy.RegisterModule(App{})
}

// App opens the engines of a config's webhook_relay handlers when the
// config starts. Handlers load it themselves; it needs no configuration.
// It exists because `caddy validate` provisions a config without starting
// it, beside a running Caddy that holds the store files: opening them in
// Provision would fail (or worse) there.
type App struct {
	names   map[string]string // relay name -> store key
	stores  map[string]string // store key -> relay name
	engines []*relay.Engine
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  appID,
		New: func() caddy.Module { return &App{names: map[string]string{}, stores: map[string]string{}} },
	}
}

func (a *App) register(name, key string) error {
	if _, dup := a.names[name]; dup {
		return fmt.Errorf("two webhook relays are named %q: give each its own name", name)
	}
	if other, dup := a.stores[key]; dup {
		return fmt.Errorf("webhook relays %q and %q use the same storage: give each its own", other, name)
	}
	a.names[name] = key
	a.stores[key] = name
	return nil
}

func (a *App) add(e *relay.Engine) { a.engines = append(a.engines, e) }

// Start opens every engine of the config (those already open from the
// previous config stay as they are), so that pending deliveries resume at
// once after a restart, before any request arrives.
func (a *App) Start() error {
	for _, e := range a.engines {
		if err := e.Open(); err != nil {
			return err
		}
	}
	return nil
}

// Stop does nothing: engines close when the last config using them is
// cleaned up, which a reload's overlap requires.
func (a *App) Stop() error { return nil }

var _ caddy.App = (*App)(nil)
