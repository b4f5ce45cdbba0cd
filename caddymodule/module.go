// Package caddymodule is the Caddy glue of caddy-webhook-relay: the
// http.handlers.webhook_relay handler, its Caddyfile directive, the
// webhook_relay app that opens engines once a config starts, the admin API
// (admin.api.webhook_relay) and the metrics registration. The engine itself
// lives in package relay.
package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler receives webhooks (OkHi's by default), authenticates them, drops
// re-deliveries, stores each event durably, acks, and relays it in the
// background to every configured target with retries, backoff and dead
// letters.
//
// The engine behind a handler (its store, dedupe keys and delivery
// workers) outlives config reloads: it is shared by every config that
// names the same storage, and new settings apply to it live.
type Handler struct {
	// Name labels this relay's metrics, logs, admin routes and default
	// storage directory. Names must be unique within a config.
	// Default: default.
	Name string `json:"name,omitempty"`

	// Source is the payload profile: `okhi` (JSON bodies; dedupe on the
	// v3 `event_id`, else on the v2 address_verification_id,
	// verification_status and verification_mode, else on the body's hash)
	// or `generic` (any bytes; dedupe on the body's hash unless
	// `dedupe.keys` is set). Default: okhi.
	Source string `json:"source,omitempty"`

	// Auth says how senders are authenticated. Required unless
	// `auth.off` is set.
	Auth *Auth `json:"auth,omitempty"`

	// MaxBody is the largest body accepted, in bytes; larger ones get
	// 413. Default: 1048576 (1 MiB).
	MaxBody int64 `json:"max_body,omitempty"`

	// MaxPending is how many events may be stored and still owed to at
	// least one target (dead letters do not count). Once reached, new
	// events get 503 with Retry-After, duplicates still get 200.
	// Default: 1000000.
	MaxPending int `json:"max_pending,omitempty"`

	// RetryAfter is the Retry-After of 503 answers. Default: 5s.
	RetryAfter caddy.Duration `json:"retry_after,omitempty"`

	// BurstHold is the longest a burst may hold deliveries to an eighth
	// of each target's concurrency, so that acks get the CPU; negative
	// turns holds off. Default: 10s.
	BurstHold caddy.Duration `json:"burst_hold,omitempty"`

	// Dedupe configures how re-deliveries are recognised and dropped.
	Dedupe *Dedupe `json:"dedupe,omitempty"`

	// Storage is where the relay keeps its events, deliveries, dead
	// letters and dedupe keys: a module of the webhook_relay.storage
	// namespace, named by its `backend` field: `bolt` (a bbolt file on
	// this machine), `memory` (not durable, logged as a warning) or
	// `nats` (NATS JetStream, shared by several Caddy instances). A JSON
	// string, as releases before storage modules wrote it, still loads:
	// `"memory"`, or the directory of a bolt store.
	// Default: bolt in <caddy data dir>/webhook_relay/<name>.
	StorageRaw json.RawMessage `json:"storage,omitempty" caddy:"namespace=webhook_relay.storage inline_key=backend"`

	// Targets are the internal endpoints every event is forwarded to (if
	// it matches their filters). At least one is required.
	Targets []Target `json:"targets,omitempty"`

	storage StorageBackend
	engine  *relay.Engine
	auth    *relay.Authenticator
	poolKey string
	logger  *zap.Logger

	lastRefusalLog *atomic.Int64 // unix ns of the last 503 logged
}

// Auth is the custom header the sender is set to send.
type Auth struct {
	// Header is the header field name, e.g. `okhi-authorization`.
	Header string `json:"header,omitempty"`
	// Values are the accepted values; several allow rotating a secret.
	// Placeholders are resolved at provision time: prefer `{env.X}` or
	// `{file./path}` to keep secrets out of the config.
	Values []string `json:"values,omitempty"`
	// Off disables authentication (logged as a warning at start).
	Off bool `json:"off,omitempty"`
}

// Dedupe configures the dedupe of re-deliveries.
type Dedupe struct {
	// Keys are gjson paths whose values make an event's dedupe key.
	// Default: from `source`.
	Keys []string `json:"keys,omitempty"`
	// Capacity is how many keys the in-memory LRU holds; older keys are
	// still found in the store. Default: 100000.
	Capacity int `json:"capacity,omitempty"`
	// TTL is how long a key counts as seen. Default: 72h.
	TTL caddy.Duration `json:"ttl,omitempty"`
	// Off disables dedupe: every request is a new event.
	Off bool `json:"off,omitempty"`
}

// Target is one internal endpoint.
type Target struct {
	// Name identifies the target in metrics, logs, dead letters and the
	// X-Webhook-Relay-Target header. Unique within a relay.
	Name string `json:"name"`
	// URL receives a POST of each event's original body.
	URL string `json:"url"`
	// Match filters events: every entry must hold (AND); an entry holds
	// when the value at its gjson path is one of its values (OR).
	// Default: every event.
	Match []Match `json:"match,omitempty"`
	// Headers are added to every forwarded request. Placeholders are
	// resolved at provision time.
	Headers http.Header `json:"headers,omitempty"`
	// Timeout bounds each attempt. Default: 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// MaxAttempts before an event becomes a dead letter. Default: 25.
	MaxAttempts int `json:"max_attempts,omitempty"`
	// BackoffMin is the first retry's delay; each retry doubles it, with
	// jitter. Default: 1s.
	BackoffMin caddy.Duration `json:"backoff_min,omitempty"`
	// BackoffMax caps the delay between attempts, and a target's
	// Retry-After. Default: 10m.
	BackoffMax caddy.Duration `json:"backoff_max,omitempty"`
	// MaxAge: an event older than this becomes a dead letter.
	// Default: 72h.
	MaxAge caddy.Duration `json:"max_age,omitempty"`
	// Concurrency is how many deliveries to this target run at once.
	// Default: 8.
	Concurrency int `json:"concurrency,omitempty"`

	Shaping
}

// Match is one filter line of a target.
type Match struct {
	// Path is a gjson path into the event's body.
	Path string `json:"path"`
	// Values are the accepted values (as strings).
	Values []string `json:"values"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.webhook_relay",
		New: func() caddy.Module { return new(Handler) },
	}
}

// StorageMemory is the JSON string with which releases before storage
// modules chose the memory store.
const StorageMemory = "memory"

// Provision builds the relay's settings and takes the engine from the
// pool (creating it, unopened, on first use). It neither does exclusive
// I/O nor changes a live engine: `caddy validate` provisions a config
// beside a running server, and a reload's new config may still fail.
// Engines take their new settings, and open, in the webhook_relay app's
// Start.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.lastRefusalLog = new(atomic.Int64)
	cfg, err := h.relayConfig()
	if err != nil {
		return err
	}
	if h.Auth != nil && !h.Auth.Off {
		values, err := resolveAll(h.Auth.Values)
		if err != nil {
			return fmt.Errorf("auth header %s: %w", h.Auth.Header, err)
		}
		if h.auth, err = relay.NewAuthenticator(h.Auth.Header, values); err != nil {
			return err
		}
	} else if h.Auth != nil && h.Auth.Off {
		h.logger.Warn("authentication is off: anyone who can reach this route can post events", zap.String("relay", cfg.Name))
	} else {
		return errors.New("auth is required: set auth_header, or auth off to accept unauthenticated requests")
	}

	appAny, err := ctx.App(appID)
	if err != nil {
		return err
	}
	app := appAny.(*App)
	// A site with several addresses on different servers (":8080, :8443")
	// copies its handlers into each: the copies are one relay. Taken
	// before loading the storage module, which clears StorageRaw.
	def, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if h.storage, err = h.loadStorage(ctx); err != nil {
		return err
	}
	key, open, err := h.storeOpener(cfg.Name)
	if err != nil {
		return err
	}
	var stream string
	if su, ok := h.storage.(streamUser); ok {
		stream = su.StreamName(cfg.Name)
	}
	if err := app.register(cfg.Name, key, stream, string(def)); err != nil {
		return err
	}
	if err := processMetrics().Register(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}

	val, _, err := engines.LoadOrNew(key, func() (caddy.Destructor, error) {
		e, err := relay.New(cfg, relay.Options{
			OpenStore: open,
			Logger:    caddy.Log().Named("http.handlers.webhook_relay"),
			Metrics:   processMetrics(),
		})
		if err != nil {
			return nil, err
		}
		return &pooledEngine{Engine: e}, nil
	})
	if err != nil {
		return err
	}
	h.poolKey = key
	h.engine = val.(*pooledEngine).Engine
	// A live engine (loaded from the pool) takes this config's settings
	// only when the config starts: provisioning alone must not change
	// the running relay, since the config may yet fail, or only be
	// validated.
	app.add(h.engine, cfg)
	if w, ok := h.storage.(storageWarner); ok {
		h.logger.Warn(w.Warning(), zap.String("relay", cfg.Name))
	}
	return nil
}

// storeOpener returns the pool key of the relay's store and how to open
// it, from the storage module Provision loaded (bolt when none is).
func (h *Handler) storeOpener(name string) (string, func() (store.Store, error), error) {
	backend := h.storage
	if backend == nil {
		backend = new(BoltStorage)
	}
	key, err := backend.PoolKey(name)
	if err != nil {
		return "", nil, err
	}
	logger := caddy.Log().Named("http.handlers.webhook_relay.storage")
	return key, func() (store.Store, error) { return backend.Open(name, logger) }, nil
}

// relayConfig maps the JSON config to the engine's, resolving placeholders
// of forwarded headers.
func (h *Handler) relayConfig() (relay.Config, error) {
	if h.Name != "" {
		if err := checkName("relay", h.Name); err != nil {
			return relay.Config{}, err
		}
	}
	for _, t := range h.Targets {
		if err := checkName("target", t.Name); err != nil {
			return relay.Config{}, err
		}
	}
	cfg := relay.Config{
		Name:       h.Name,
		Source:     relay.Source(h.Source),
		MaxBody:    h.MaxBody,
		MaxPending: h.MaxPending,
		RetryAfter: timeDuration(h.RetryAfter),
		BurstHold:  timeDuration(h.BurstHold),
	}
	if h.Dedupe != nil {
		cfg.Dedupe = relay.DedupeConfig{
			Keys:     h.Dedupe.Keys,
			Capacity: h.Dedupe.Capacity,
			TTL:      timeDuration(h.Dedupe.TTL),
			Off:      h.Dedupe.Off,
		}
	}
	for _, t := range h.Targets {
		tc := relay.TargetConfig{
			Name:        t.Name,
			URL:         t.URL,
			Timeout:     timeDuration(t.Timeout),
			MaxAttempts: t.MaxAttempts,
			BackoffMin:  timeDuration(t.BackoffMin),
			BackoffMax:  timeDuration(t.BackoffMax),
			MaxAge:      timeDuration(t.MaxAge),
			Concurrency: t.Concurrency,
		}
		for _, m := range t.Match {
			tc.Match = append(tc.Match, relay.Match{Path: m.Path, Values: m.Values})
		}
		if err := t.Shaping.apply(&tc); err != nil {
			return cfg, fmt.Errorf("target %s: %w", t.Name, err)
		}
		if len(t.Headers) > 0 {
			tc.Headers = http.Header{}
			for k, vs := range t.Headers {
				if strings.EqualFold(k, "Host") {
					return cfg, fmt.Errorf("target %s: header Host cannot be set", t.Name)
				}
				if !httpguts.ValidHeaderFieldName(k) {
					return cfg, fmt.Errorf("target %s: header field %q is not a valid HTTP header name", t.Name, k)
				}
				for _, v := range vs {
					rv, err := resolveTemplate(v)
					if err != nil {
						return cfg, fmt.Errorf("target %s: header %s: %w", t.Name, k, err)
					}
					if !httpguts.ValidHeaderFieldValue(rv) {
						return cfg, fmt.Errorf("target %s: header %s: the value (after placeholders) has characters an HTTP header cannot carry", t.Name, k)
					}
					tc.Headers.Add(k, rv)
				}
			}
		}
		cfg.Targets = append(cfg.Targets, tc)
	}
	return cfg.WithDefaults()
}

// checkName accepts the names of relays and targets: they appear in
// admin API paths, directory names, metric labels and the
// X-Webhook-Relay-Target header.
func checkName(what, name string) error {
	ok := name != "" && name[0] != '.' && len(name) <= 64
	for _, r := range name {
		if !ok {
			break
		}
		ok = r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.'
	}
	if !ok {
		return fmt.Errorf("%s name %q: use up to 64 letters, digits, '-', '_' and '.', not starting with '.'", what, name)
	}
	return nil
}

// resolve replaces global placeholders ({env.X}, {file./path}, ...).
func resolve(v string) (string, error) {
	out, err := caddy.NewReplacer().ReplaceOrErr(v, true, true)
	if err != nil {
		return "", fmt.Errorf("resolving placeholders: %w", err)
	}
	return out, nil
}

// resolveTemplate resolves the global placeholders of a value that may
// also hold {event.*} placeholders, which it leaves for each attempt.
// What a global placeholder resolves to is escaped, so that a file or an
// environment variable holding "{event.json.x}" is sent as that text and
// never expanded with a payload's values.
func resolveTemplate(v string) (string, error) {
	repl := caddy.NewReplacer()
	repl.Map(func(key string) (any, bool) {
		if strings.HasPrefix(key, "event.") {
			return "{" + key + "}", true
		}
		return nil, false
	})
	out, err := repl.ReplaceFunc(v, func(key string, val any) (any, error) {
		if strings.HasPrefix(key, "event.") {
			return val, nil
		}
		if val == nil {
			return nil, fmt.Errorf("resolving placeholders: unrecognized placeholder {%s}", key)
		}
		s := caddy.ToString(val)
		if s == "" {
			return nil, fmt.Errorf("resolving placeholders: evaluated placeholder {%s} is empty", key)
		}
		return shape.EscapeText(s), nil
	})
	if err != nil {
		return "", err
	}
	return out, nil
}

func resolveAll(values []string) ([]string, error) {
	out := make([]string, 0, len(values))
	for i, v := range values {
		rv, err := resolve(v)
		if err != nil {
			return nil, err
		}
		rv = strings.TrimSpace(rv)
		if rv == "" {
			return nil, fmt.Errorf("value %d (%s) is empty after placeholders", i+1, redactPlaceholder(v))
		}
		out = append(out, rv)
	}
	return out, nil
}

// redactPlaceholder shows a value only when it is a placeholder, never a
// literal secret.
func redactPlaceholder(v string) string {
	if strings.HasPrefix(v, "{") && strings.HasSuffix(v, "}") {
		return v
	}
	return "a literal value"
}

// Validate checks what Provision could not.
func (h *Handler) Validate() error {
	if h.engine == nil {
		return errors.New("webhook_relay: not provisioned")
	}
	return nil
}

// Cleanup releases this config's hold on the engine; the last release
// closes it. Requests still reaching this handler afterwards get 503.
func (h *Handler) Cleanup() error {
	if h.poolKey == "" {
		return nil
	}
	_, err := engines.Delete(h.poolKey)
	h.poolKey = ""
	return err
}

var (
	metricsOnce sync.Once
	metrics     *relay.Metrics
)

// processMetrics are created once per process and registered into each
// config's registry, so counters survive reloads.
func processMetrics() *relay.Metrics {
	metricsOnce.Do(func() { metrics = relay.NewMetrics() })
	return metrics
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
