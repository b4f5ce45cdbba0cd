package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// TestRestartDeliversPending: events acked while the target is down are
// delivered after Caddy stops and starts again, and their re-deliveries
// are still recognised.
func TestRestartDeliversPending(t *testing.T) {
	const port = 9089
	const n = 5
	target := newTarget(t, http.StatusServiceUnavailable)
	storage := t.TempDir()
	config := siteConfig(port, fmt.Sprintf(`
	webhook_relay restart {
		auth_header X-Secret %s
		storage %s
		forward crm %s {
			backoff 20ms 100ms
		}
	}`, secret, storage, target.URL))
	tester := startCaddy(t, config)
	url := fmt.Sprintf("http://localhost:%d/", port)

	var ids, bodies []string
	for i := range n {
		body := okhiEvent(fmt.Sprintf("restart-%d", i), "verified")
		bodies = append(bodies, body)
		ids = append(ids, ack(t, post(t, tester, url, body), "accepted"))
	}
	waitFor(t, 5*time.Second, "a failed attempt", func() bool { return len(target.requests()) > 0 })

	stopCaddy(t)
	path := filepath.Join(storage, "relay.db")
	if _, ok := engines.References("bolt:" + path); ok {
		t.Fatal("the engine is still in the pool after the last config using it stopped")
	}
	// The engine closed the file: it opens at once, and holds every event.
	st, err := store.OpenBolt(path, store.BoltOptions{Timeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatalf("reopening the store after stop: %v", err)
	}
	stats, err := st.Stats(time.Now())
	if cerr := st.Close(); cerr != nil {
		t.Fatal(cerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	if stats.PendingEvents != n || stats.Pending["crm"] != n {
		t.Fatalf("store after stop: %d pending events (%v at crm), want %d", stats.PendingEvents, stats.Pending, n)
	}
	if len(target.delivered()) != 0 {
		t.Fatal("the target, down, took deliveries")
	}
	var o overview
	if r := admin(t, tester.Client, http.MethodGet, "/webhook_relay/", "", &o); r.status != http.StatusOK || len(o.Relays) != 0 {
		t.Errorf("overview while stopped: %d %q, want no relays", r.status, r.body)
	}

	target.status.Store(http.StatusOK)
	loadConfig(t, tester, config)
	target.waitDelivered(t, 10*time.Second, ids...)
	assertDeliveredOnce(t, "crm", target, ids)
	for i, body := range bodies {
		if id := ack(t, post(t, tester, url, body), "duplicate"); id != ids[i] {
			t.Errorf("re-delivery of event %d: event_id %s, want %s", i, id, ids[i])
		}
	}
}

// TestValidateBesideRunningServer: `caddy validate` provisions a config
// beside the running one. With the same storage, it must neither open
// the store file (bbolt would wait for the running relay's lock) nor
// change the running relay.
func TestValidateBesideRunningServer(t *testing.T) {
	const port = 9090
	crm := newTarget(t, http.StatusServiceUnavailable)
	other := newTarget(t, http.StatusOK)
	storage := t.TempDir()
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay validate {
		auth_header X-Secret %s
		storage %s
		forward crm %s {
			backoff 1m 1m
		}
	}`, secret, storage, crm.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)
	for i := range 2 {
		ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("v-%d", i), "verified")), "accepted")
	}

	// The config to validate differs: crm is gone, another target is new.
	cfg := adaptConfig(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay validate {
		auth_header X-Secret other
		storage %s
		forward other %s
	}`, storage, other.URL)))
	start := time.Now()
	err := caddy.Validate(cfg)
	if took := time.Since(start); took > time.Second {
		t.Errorf("validate took %s: it waited for the store file", took)
	}
	if err != nil {
		t.Fatalf("validate: %v", err)
	}

	key := "bolt:" + filepath.Join(storage, "relay.db")
	if refs, ok := engines.References(key); !ok || refs != 1 {
		t.Errorf("engine references after validate: %d (in pool: %v), want 1", refs, ok)
	}
	s, ok := targetStats(t, tester.Client, "validate", "crm")
	if !ok || !s.Configured || s.Pending != 2 || s.DeadLetters != 0 {
		t.Errorf("crm after validate: %+v (listed: %v), want configured with 2 pending", s, ok)
	}
	if _, ok := targetStats(t, tester.Client, "validate", "other"); ok {
		t.Error("the validated config's target runs in the live relay")
	}
	if r := post(t, tester, url, okhiEvent("v-after", "verified")); r.status != http.StatusOK {
		t.Errorf("after validate, the relay answers %d (%q) with the running config's secret", r.status, r.body)
	}
	if n := len(other.requests()); n != 0 {
		t.Errorf("the validated config's target got %d requests", n)
	}
}

// adaptConfig adapts a Caddyfile into a config for caddy.Validate.
func adaptConfig(t *testing.T, caddyfile string) *caddy.Config {
	t.Helper()
	raw, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	var cfg caddy.Config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	return &cfg
}

// TestValidateErrors: what only provisioning can find (placeholders, JSON
// written by hand) fails validation with a sentence that says what.
func TestValidateErrors(t *testing.T) {
	t.Setenv("WEBHOOK_RELAY_TEST_EMPTY", "")
	t.Setenv("WEBHOOK_RELAY_TEST_BLANK", " ")
	storage := t.TempDir()
	relayJSON := func(name, storage, auth string) string {
		return fmt.Sprintf(`{"handler":"webhook_relay","name":%q,"storage":%q,%s,
			"targets":[{"name":"t1","url":"http://127.0.0.1:9/"}]}`, name, storage, auth)
	}
	config := func(handlers ...string) string {
		return `{"apps":{"http":{"servers":{"srv0":{"listen":["127.0.0.1:9099"],"routes":[{"handle":[` +
			strings.Join(handlers, ",") + `]}]}}}}}`
	}
	tests := []struct {
		name   string
		config string
		want   []string
	}{
		{
			name:   "auth value empty after placeholders",
			config: config(relayJSON("a", storage+"/a", `"auth":{"header":"X-Secret","values":["ok","{env.WEBHOOK_RELAY_TEST_EMPTY}"]}`)),
			want:   []string{"auth header X-Secret", "placeholder {env.WEBHOOK_RELAY_TEST_EMPTY} is empty"},
		},
		{
			name:   "auth value blank after placeholders",
			config: config(relayJSON("a", storage+"/a", `"auth":{"header":"X-Secret","values":["{env.WEBHOOK_RELAY_TEST_BLANK}"]}`)),
			want:   []string{"auth header X-Secret: value 1 ({env.WEBHOOK_RELAY_TEST_BLANK}) is empty after placeholders"},
		},
		{
			name:   "literal secret is not echoed",
			config: config(relayJSON("a", storage+"/a", `"auth":{"header":"X-Secret","values":["   "]}`)),
			want:   []string{"auth header X-Secret: value 1", "is empty after placeholders"},
		},
		{
			name: "forwarded header placeholder empty",
			config: config(`{"handler":"webhook_relay","auth":{"off":true},"storage":"` + storage + `/h",
				"targets":[{"name":"t1","url":"http://127.0.0.1:9/","headers":{"Authorization":["Bearer {env.WEBHOOK_RELAY_TEST_EMPTY}"]}}]}`),
			want: []string{"target t1: header Authorization", "placeholder {env.WEBHOOK_RELAY_TEST_EMPTY} is empty"},
		},
		{
			name:   "bad target URL",
			config: `{"apps":{"http":{"servers":{"srv0":{"listen":["127.0.0.1:9099"],"routes":[{"handle":[{"handler":"webhook_relay","auth":{"off":true},"targets":[{"name":"t1","url":"ftp://x/"}]}]}]}}}}}`,
			want:   []string{`target "t1": bad URL "ftp://x/": scheme must be http or https`},
		},
		{
			name:   "no auth",
			config: config(relayJSON("a", storage+"/a", `"max_body":10`)),
			want:   []string{"auth is required"},
		},
		{
			name: "two relays with the same name",
			config: config(
				relayJSON("dup", storage+"/a", `"auth":{"off":true}`),
				relayJSON("dup", storage+"/b", `"auth":{"off":true}`)),
			want: []string{`two webhook relays are named "dup"`},
		},
		{
			name: "two relays with the same storage",
			config: config(
				relayJSON("a", storage+"/same", `"auth":{"off":true}`),
				relayJSON("b", storage+"/same", `"auth":{"off":true}`)),
			want: []string{`webhook relays "a" and "b" use the same storage`},
		},
		{
			name: "two relays with the same name and storage, defined differently",
			config: config(
				relayJSON("dup", storage+"/same", `"auth":{"off":true}`),
				relayJSON("dup", storage+"/same", `"auth":{"off":true},"max_body":10`)),
			want: []string{`two webhook relays are named "dup"`},
		},
		{
			name:   "relay name that is a path",
			config: config(relayJSON("../etc", storage+"/a", `"auth":{"off":true}`)),
			want:   []string{`relay name "../etc": use up to 64 letters, digits`},
		},
		{
			name:   "no targets",
			config: `{"apps":{"http":{"servers":{"srv0":{"listen":["127.0.0.1:9099"],"routes":[{"handle":[{"handler":"webhook_relay","auth":{"off":true}}]}]}}}}}`,
			want:   []string{"at least one target is required"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var cfg caddy.Config
			if err := json.Unmarshal([]byte(tt.config), &cfg); err != nil {
				t.Fatal(err)
			}
			err := caddy.Validate(&cfg)
			if err == nil {
				t.Fatalf("no error; want one containing %q", tt.want)
			}
			assertContains(t, err.Error(), tt.want...)
		})
	}
	if n := engineCount(); n != 0 {
		t.Errorf("%d engines left in the pool after failed validations", n)
	}
}

func engineCount() int {
	n := 0
	engines.Range(func(_, _ any) bool { n++; return true })
	return n
}

// TestStoreLocation: where each storage setting keeps the relay's store,
// which is also the key under which reloads share its engine.
func TestStoreLocation(t *testing.T) {
	data := t.TempDir()
	t.Setenv("XDG_DATA_HOME", data)
	rel := filepath.Join("data", "relay")
	abs, err := filepath.Abs(rel)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		storage    StorageBackend
		name, want string
	}{
		{nil, "okhi", "bolt:" + filepath.Join(data, "caddy", "webhook_relay", "okhi", "relay.db")},
		{&BoltStorage{}, "okhi", "bolt:" + filepath.Join(data, "caddy", "webhook_relay", "okhi", "relay.db")},
		{&BoltStorage{Dir: "/var/lib/relay"}, "okhi", "bolt:/var/lib/relay/relay.db"},
		{&BoltStorage{Dir: "/var/lib/relay/"}, "okhi", "bolt:/var/lib/relay/relay.db"},
		{&BoltStorage{Dir: rel}, "okhi", "bolt:" + filepath.Join(abs, "relay.db")},
		{MemoryStorage{}, "okhi", "memory:okhi"},
	}
	for _, tt := range tests {
		h := Handler{storage: tt.storage}
		key, open, err := h.storeOpener(tt.name)
		if err != nil {
			t.Errorf("storage %#v: %v", tt.storage, err)
			continue
		}
		if key != tt.want || open == nil {
			t.Errorf("storage %#v of relay %s: key %q, want %q", tt.storage, tt.name, key, tt.want)
		}
	}
}
