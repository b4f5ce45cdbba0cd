package caddymodule

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store/natsstore"
)

func init() {
	caddy.RegisterModule(BoltStorage{})
	caddy.RegisterModule(MemoryStorage{})
	caddy.RegisterModule(NATSStorage{})
}

// StorageBackend is where a relay keeps its state: a guest module in the
// webhook_relay.storage namespace, chosen by the handler's
// `storage.backend`.
type StorageBackend interface {
	// PoolKey identifies the store the backend opens for the relay named
	// relayName. Configs whose relays have equal keys share one engine
	// (and its store and connections) across reloads; a reload that
	// changes the key gets a new engine, and the old one closes once no
	// config uses it. Two relays of one config must have different keys.
	PoolKey(relayName string) (string, error)
	// Open opens the store, once per engine, when the first config that
	// uses it starts (never under `caddy validate`). logger is the
	// process's, since the store outlives the config.
	Open(relayName string, logger *zap.Logger) (store.Store, error)
}

// storageWarner is a backend with a caveat the user must hear at every
// start.
type storageWarner interface {
	Warning() string
}

// streamUser is a backend that keeps each relay in a named stream on a
// server other relays may share: two relays of one config must not name
// the same stream, even with different URLs (they may reach one cluster).
type streamUser interface {
	StreamName(relayName string) string
}

// BoltStorage keeps the relay's state in a bbolt file on this machine,
// with every write fsynced (group-committed) before the ack. This is the
// default storage.
type BoltStorage struct {
	// Dir is the directory of the relay's bbolt file, relay.db; it is
	// created if missing. No two relays may share one. Default:
	// <caddy data dir>/webhook_relay/<name>.
	Dir string `json:"dir,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (BoltStorage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "webhook_relay.storage.bolt",
		New: func() caddy.Module { return new(BoltStorage) },
	}
}

// path is the absolute path of the relay's bbolt file.
func (b *BoltStorage) path(relayName string) (string, error) {
	dir := b.Dir
	if dir == "" {
		dir = filepath.Join(caddy.AppDataDir(), "webhook_relay", relayName)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("storage directory %s: %w", dir, err)
	}
	return filepath.Join(abs, "relay.db"), nil
}

// PoolKey is "bolt:<absolute path of the file>": the file must never be
// opened twice, and bbolt's lock would make a second open wait.
func (b *BoltStorage) PoolKey(relayName string) (string, error) {
	p, err := b.path(relayName)
	if err != nil {
		return "", err
	}
	return "bolt:" + p, nil
}

// Open opens (or creates) the relay's bbolt file.
func (b *BoltStorage) Open(relayName string, _ *zap.Logger) (store.Store, error) {
	p, err := b.path(relayName)
	if err != nil {
		return nil, err
	}
	s, err := store.OpenBolt(p, store.BoltOptions{Timeout: storeLockTimeout})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// MemoryStorage keeps the relay's state in memory: acknowledged events
// are lost when Caddy stops (logged as a warning at every start). For
// tests and demos; it is kept across config reloads.
type MemoryStorage struct{}

// CaddyModule returns the Caddy module information.
func (MemoryStorage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "webhook_relay.storage.memory",
		New: func() caddy.Module { return new(MemoryStorage) },
	}
}

// PoolKey is "memory:<relay name>".
func (MemoryStorage) PoolKey(relayName string) (string, error) { return "memory:" + relayName, nil }

// Open makes an empty store.
func (MemoryStorage) Open(string, *zap.Logger) (store.Store, error) {
	return store.NewMemory(store.MemoryOptions{}), nil
}

// Warning says that the store is not durable.
func (MemoryStorage) Warning() string { return "storage is memory: events are lost when Caddy stops" }

// NATSStorage keeps the relay's state in NATS JetStream, so that several
// Caddy instances behind a load balancer share one relay: each event is
// stored once, delivered by one instance at a time, and its dead letters
// are seen by all. Every instance of a relay names the same URLs and
// stream. Needs NATS server 2.11 or later; run a single node with
// `sync_interval: always`, or a cluster with replicas 3, for an
// acknowledged event to survive the loss of a machine.
//
// NATS being unreachable does not stop Caddy from starting: the relay
// answers 503 with Retry-After until it connects.
type NATSStorage struct {
	// URLs of the NATS servers: nats://, tls://, ws:// or wss://, with a
	// host and, optionally, a port (default 4222). Required: at least
	// one; every instance of the relay names the same servers.
	URLs []string `json:"urls,omitempty"`

	// Stream is the name of the relay's JetStream stream; its consumers
	// and buckets are named after it. Created on first use, and checked
	// (never changed) when it exists. Letters, digits, '-' and '_'.
	// Default: WEBHOOK_RELAY_<NAME>, the relay's name upper-cased with
	// every character outside A-Z and 0-9 as '_'.
	Stream string `json:"stream,omitempty"`

	// Replicas of the stream, its consumers and buckets: 1 to 5.
	// Default: 1 (3 in production).
	Replicas int `json:"replicas,omitempty"`

	// Creds is a NATS credentials file (JWT and nkey seed). At most one
	// of creds, token and user may be set. Placeholders ({env.X},
	// {file./path}) are resolved when the config loads; credentials are
	// never logged. Default: none.
	Creds string `json:"creds,omitempty"`
	// Token authenticates with a token; placeholders are resolved when
	// the config loads. Default: none.
	Token string `json:"token,omitempty"`
	// User authenticates with a user name and Password; placeholders are
	// resolved when the config loads. Default: none.
	User string `json:"user,omitempty"`
	// Password of User, required with it; placeholders are resolved when
	// the config loads. Default: none.
	Password string `json:"password,omitempty"`

	// TLSCA is a PEM file of the CA that signed the servers'
	// certificates. Files named by tls_* and creds are read when the
	// config loads (a missing one fails the load), and a reload after
	// one changed reconnects. Default: the system's roots.
	TLSCA string `json:"tls_ca,omitempty"`
	// TLSClientCert is a PEM certificate file for mutual TLS, with
	// TLSClientKey. Default: none.
	TLSClientCert string `json:"tls_client_cert,omitempty"`
	// TLSClientKey is the PEM key file of TLSClientCert. Default: none.
	TLSClientKey string `json:"tls_client_key,omitempty"`

	// ConnectTimeout bounds each attempt to connect to a server.
	// Default: 5s.
	ConnectTimeout caddy.Duration `json:"connect_timeout,omitempty"`
	// Timeout is how long intake waits for JetStream's acknowledgement of
	// an event before answering 503. Default: 2s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// cfg has the resolved credentials; digest identifies every setting
	// but the URLs' hosts and the stream, for the pool key.
	cfg    natsstore.Config
	digest string
}

// CaddyModule returns the Caddy module information.
func (NATSStorage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "webhook_relay.storage.nats",
		New: func() caddy.Module { return new(NATSStorage) },
	}
}

// maxReplicas is JetStream's limit.
const maxReplicas = 5

// Provision checks the settings, resolves the credentials' placeholders
// and reads the files they name, so that a missing file fails the load
// and a changed one (a renewed certificate, rotated credentials) counts
// as a change at the next reload.
func (n *NATSStorage) Provision(caddy.Context) error {
	if err := n.check(); err != nil {
		return err
	}
	cfg := natsstore.Config{
		URLs:           n.URLs,
		Replicas:       n.Replicas,
		ConnectTimeout: time.Duration(n.ConnectTimeout),
		Timeout:        time.Duration(n.Timeout),
	}
	for _, f := range []struct {
		name string
		raw  string
		dst  *string
	}{
		{"creds", n.Creds, &cfg.CredsFile},
		{"token", n.Token, &cfg.Token},
		{"user", n.User, &cfg.User},
		{"password", n.Password, &cfg.Password},
		{"tls_ca", n.TLSCA, &cfg.TLSCA},
		{"tls_client_cert", n.TLSClientCert, &cfg.TLSCert},
		{"tls_client_key", n.TLSClientKey, &cfg.TLSKey},
	} {
		if f.raw == "" {
			continue
		}
		v, err := resolve(f.raw)
		if err != nil {
			return fmt.Errorf("storage nats: %s: %w", f.name, err)
		}
		if v == "" {
			return fmt.Errorf("storage nats: %s (%s) is empty after placeholders", f.name, redactPlaceholder(f.raw))
		}
		*f.dst = v
	}
	digest, err := natsDigest(cfg)
	if err != nil {
		return err
	}
	n.cfg, n.digest = cfg, digest
	return nil
}

// check is what the Caddyfile adapter checks too, for JSON configs.
func (n *NATSStorage) check() error {
	if len(n.URLs) == 0 {
		return errors.New("storage nats needs at least one URL")
	}
	for _, u := range n.URLs {
		if err := checkNATSURL(u); err != nil {
			return fmt.Errorf("storage nats: %w", err)
		}
	}
	if n.Stream != "" {
		if err := checkStreamName(n.Stream); err != nil {
			return fmt.Errorf("storage nats: %w", err)
		}
	}
	if n.Replicas < 0 || n.Replicas > maxReplicas {
		return fmt.Errorf("storage nats: replicas must be 1 to %d, not %d", maxReplicas, n.Replicas)
	}
	var kinds []string
	if n.Creds != "" {
		kinds = append(kinds, "creds")
	}
	if n.Token != "" {
		kinds = append(kinds, "token")
	}
	if n.User != "" || n.Password != "" {
		kinds = append(kinds, "user")
	}
	if len(kinds) > 1 {
		return fmt.Errorf("storage nats: set one kind of credentials, not %s", strings.Join(kinds, " and "))
	}
	if (n.User == "") != (n.Password == "") {
		return errors.New("storage nats: user and password go together")
	}
	if (n.TLSClientCert == "") != (n.TLSClientKey == "") {
		return errors.New("storage nats: tls_client_cert and tls_client_key go together")
	}
	if n.ConnectTimeout < 0 || n.Timeout < 0 {
		return errors.New("storage nats: connect_timeout and timeout cannot be negative")
	}
	return nil
}

// StreamName is the relay's stream: the configured one, or the default
// derived from the relay's name.
func (n *NATSStorage) StreamName(relayName string) string {
	if n.Stream != "" {
		return n.Stream
	}
	return defaultStream(relayName)
}

// PoolKey is "nats:<sorted URLs>|<stream>|<digest>", the URLs without
// their user info, the digest over every other setting (credentials,
// TLS files' contents, replicas, timeouts): a reload that changes any of
// them reconnects with the new settings; one that changes none keeps
// the engine and its connection.
func (n *NATSStorage) PoolKey(relayName string) (string, error) {
	if n.digest == "" {
		return "", errors.New("storage nats: not provisioned")
	}
	hosts := make([]string, 0, len(n.URLs))
	for _, raw := range n.URLs {
		u, err := url.Parse(raw)
		if err != nil {
			return "", fmt.Errorf("storage nats: %w", err)
		}
		u.User = nil
		hosts = append(hosts, u.String())
	}
	slices.Sort(hosts)
	return "nats:" + strings.Join(hosts, ",") + "|" + n.StreamName(relayName) + "|" + n.digest, nil
}

// Open connects to NATS in the background: a store that cannot reach its
// server is open but down (503 at intake) until it can.
func (n *NATSStorage) Open(relayName string, logger *zap.Logger) (store.Store, error) {
	cfg := n.cfg
	cfg.Stream = n.StreamName(relayName)
	cfg.Name = relayName
	cfg.Logger = logger
	s, err := natsstore.Open(cfg)
	if err != nil {
		return nil, fmt.Errorf("storage nats: stream %s: %w", cfg.Stream, err)
	}
	return s, nil
}

// natsDigest hashes what identifies a NATS connection besides its hosts
// and stream. It is kept in memory only (the pool key), yet a hash, so
// that no key ever holds a secret.
func natsDigest(cfg natsstore.Config) (string, error) {
	h := sha256.New()
	field := func(s string) { fmt.Fprintf(h, "%d:%s;", len(s), s) }
	// User info in a URL is a credential: in the digest, in the URLs'
	// sorted order, and out of the key's readable part.
	urls := slices.Clone(cfg.URLs)
	slices.SortFunc(urls, func(a, b string) int { return strings.Compare(withoutUser(a), withoutUser(b)) })
	for _, raw := range urls {
		u, err := url.Parse(raw)
		if err != nil {
			return "", fmt.Errorf("storage nats: %w", err)
		}
		field(u.User.String())
	}
	field(cfg.Token)
	field(cfg.User)
	field(cfg.Password)
	for _, f := range []string{cfg.CredsFile, cfg.TLSCA, cfg.TLSCert, cfg.TLSKey} {
		field(f)
		if err := hashFile(h, f); err != nil {
			return "", err
		}
	}
	field(strconv.Itoa(max(cfg.Replicas, 1)))
	field(cfg.ConnectTimeout.String())
	field(cfg.Timeout.String())
	return hex.EncodeToString(h.Sum(nil)[:12]), nil
}

func hashFile(h hash.Hash, path string) error {
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("storage nats: reading %s: %w", path, err)
	}
	sum := sha256.Sum256(b)
	h.Write(sum[:])
	return nil
}

func withoutUser(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return raw
	}
	u.User = nil
	return u.String()
}

// natsSchemes are the URL schemes nats.go connects with.
var natsSchemes = []string{"nats", "tls", "ws", "wss"}

// checkNATSURL accepts a URL nats.go connects to. Its messages never show
// a password the URL holds.
func checkNATSURL(raw string) error {
	// nats.go would take "host:4222" as nats://host:4222; the config
	// says which scheme it means.
	if !strings.Contains(raw, "://") {
		return errors.New("bad NATS URL: it needs a scheme: nats://, tls://, ws:// or wss:// (e.g. nats://127.0.0.1:4222)")
	}
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("bad NATS URL: %w", err)
	}
	if !slices.Contains(natsSchemes, u.Scheme) {
		return fmt.Errorf("bad NATS URL %s: the scheme must be nats, tls, ws or wss", u.Redacted())
	}
	if u.Hostname() == "" {
		return fmt.Errorf("bad NATS URL %s: no host", u.Redacted())
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("bad NATS URL %s: bad port", u.Redacted())
		}
	}
	return nil
}

// maxStreamName leaves room within JetStream's 255 characters for the
// names of the buckets and consumers made from the stream's name.
const maxStreamName = 128

// checkStreamName accepts names that are also valid in KV bucket names,
// which are stricter than stream names.
func checkStreamName(name string) error {
	ok := name != "" && len(name) <= maxStreamName
	for _, r := range name {
		if !ok {
			break
		}
		ok = r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_'
	}
	if !ok {
		return fmt.Errorf("stream name %q: use up to %d letters, digits, '-' and '_'", name, maxStreamName)
	}
	return nil
}

// defaultStream is WEBHOOK_RELAY_<NAME>: distinct relay names can map to
// one stream (a.b and a_b), which register refuses.
func defaultStream(relayName string) string {
	var b strings.Builder
	b.WriteString("WEBHOOK_RELAY_")
	for _, r := range relayName {
		switch {
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case r >= 'a' && r <= 'z':
			b.WriteRune(r - 'a' + 'A')
		default:
			b.WriteByte('_')
		}
	}
	return b.String()
}

// loadStorage loads the handler's storage module. A JSON string, the
// storage setting of releases before storage was a module, still loads:
// "memory", or the directory of a bbolt store.
func (h *Handler) loadStorage(ctx caddy.Context) (StorageBackend, error) {
	raw, err := upgradeStorage(h.StorageRaw)
	if err != nil {
		return nil, err
	}
	if raw == nil {
		return new(BoltStorage), nil
	}
	h.StorageRaw = raw
	mod, err := ctx.LoadModule(h, "StorageRaw")
	if err != nil {
		return nil, fmt.Errorf("loading storage: %w", err)
	}
	backend, ok := mod.(StorageBackend)
	if !ok {
		return nil, fmt.Errorf("storage module %T is not a storage backend", mod)
	}
	return backend, nil
}

// upgradeStorage turns the JSON string of earlier releases into the
// module it meant, and an absent setting (or null, or "") into nil.
func upgradeStorage(raw json.RawMessage) (json.RawMessage, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, nil
	}
	if raw[0] != '"' {
		return raw, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	switch s {
	case "":
		return nil, nil
	case StorageMemory:
		return json.RawMessage(`{"backend":"memory"}`), nil
	}
	return json.Marshal(struct {
		Backend string `json:"backend"`
		Dir     string `json:"dir"`
	}{"bolt", s})
}

// storageStream is the NATS stream of a relay's raw storage setting, or
// "" when it is on another backend: for the adapter, which sees the
// setting before any module is loaded.
func storageStream(raw json.RawMessage, relayName string) string {
	var probe struct {
		Backend string `json:"backend"`
	}
	if json.Unmarshal(raw, &probe) != nil || probe.Backend != "nats" {
		return ""
	}
	var n NATSStorage
	if json.Unmarshal(raw, &n) != nil {
		return ""
	}
	return n.StreamName(relayName)
}

// Interface guards.
var (
	_ StorageBackend    = (*BoltStorage)(nil)
	_ StorageBackend    = (*MemoryStorage)(nil)
	_ storageWarner     = (*MemoryStorage)(nil)
	_ StorageBackend    = (*NATSStorage)(nil)
	_ streamUser        = (*NATSStorage)(nil)
	_ caddy.Provisioner = (*NATSStorage)(nil)
)
