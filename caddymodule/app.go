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
	relays  map[string]appRelay // relay name -> its definition
	stores  map[string]string   // store key -> relay name
	streams map[string]string   // NATS stream -> relay name
	engines []appEngine
}

// appRelay is what a config says of one relay name.
type appRelay struct {
	key string // the store's pool key
	def string // the handler's JSON config
}

// appEngine is an engine of the config and the settings the config gives it.
type appEngine struct {
	engine *relay.Engine
	cfg    relay.Config
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID: appID,
		New: func() caddy.Module {
			return &App{relays: map[string]appRelay{}, stores: map[string]string{}, streams: map[string]string{}}
		},
	}
}

// register records a relay of the config: its name, its store's pool
// key and, on NATS, its stream ("" otherwise). Handlers with the same
// name are an error, unless they are copies of one definition (the HTTP
// app copies a site's routes into each server the site listens on); so
// are two relays on one store or one stream. Streams are compared
// whatever their URLs, which may reach one cluster by different names.
func (a *App) register(name, key, stream, def string) error {
	if r, dup := a.relays[name]; dup {
		if r.key == key && r.def == def {
			return nil
		}
		return fmt.Errorf("two webhook relays are named %q: give each its own name", name)
	}
	if other, dup := a.streams[stream]; dup && stream != "" {
		return fmt.Errorf("webhook relays %q and %q use the same NATS stream %s (a default stream name is the relay name upper-cased, with every character outside A-Z and 0-9 as '_'): set stream in the storage of one of them", other, name, stream)
	}
	if other, dup := a.stores[key]; dup {
		return fmt.Errorf("webhook relays %q and %q use the same storage: give each its own", other, name)
	}
	a.relays[name] = appRelay{key: key, def: def}
	a.stores[key] = name
	if stream != "" {
		a.streams[stream] = name
	}
	return nil
}

func (a *App) add(e *relay.Engine, cfg relay.Config) {
	for _, ae := range a.engines {
		if ae.engine == e {
			return // a copy of a relay already added
		}
	}
	a.engines = append(a.engines, appEngine{engine: e, cfg: cfg})
}

// Start applies the config's settings to its engines (those still open
// from the previous config take them live) and opens the engines not yet
// open, so that pending deliveries resume at once after a restart, before
// any request arrives.
func (a *App) Start() error {
	for _, ae := range a.engines {
		if err := ae.engine.Update(ae.cfg); err != nil {
			return fmt.Errorf("relay %s: %w", ae.cfg.Name, err)
		}
		if err := ae.engine.Open(); err != nil {
			return err
		}
	}
	return nil
}

// Stop does nothing: engines close when the last config using them is
// cleaned up, which a reload's overlap requires.
func (a *App) Stop() error { return nil }

var _ caddy.App = (*App)(nil)
