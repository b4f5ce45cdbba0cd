package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
)

func TestDefaultStream(t *testing.T) {
	tests := []struct{ relay, want string }{
		{"default", "WEBHOOK_RELAY_DEFAULT"},
		{"okhi", "WEBHOOK_RELAY_OKHI"},
		{"a.b", "WEBHOOK_RELAY_A_B"},
		{"a_b", "WEBHOOK_RELAY_A_B"},
		{"Okhi-Prod.2", "WEBHOOK_RELAY_OKHI_PROD_2"},
	}
	for _, tt := range tests {
		if got := new(NATSStorage).StreamName(tt.relay); got != tt.want {
			t.Errorf("default stream of relay %q: %q, want %q", tt.relay, got, tt.want)
		}
		if err := checkStreamName(defaultStream(tt.relay)); err != nil {
			t.Errorf("default stream of relay %q is not a valid stream name: %v", tt.relay, err)
		}
	}
	if got := (&NATSStorage{Stream: "OKHI"}).StreamName("other"); got != "OKHI" {
		t.Errorf("configured stream: %q, want OKHI", got)
	}
}

// TestUpgradeStorage: the JSON string of earlier releases means the
// module it always meant.
func TestUpgradeStorage(t *testing.T) {
	tests := []struct{ raw, want string }{
		{``, ``},
		{`null`, ``},
		{`""`, ``},
		{`"memory"`, `{"backend":"memory"}`},
		{`"/var/lib/caddy/relay"`, `{"backend":"bolt","dir":"/var/lib/caddy/relay"}`},
		{`"data/relay"`, `{"backend":"bolt","dir":"data/relay"}`},
		{`{"backend":"nats","urls":["nats://n1:4222"]}`, `{"backend":"nats","urls":["nats://n1:4222"]}`},
	}
	for _, tt := range tests {
		got, err := upgradeStorage(json.RawMessage(tt.raw))
		if err != nil {
			t.Errorf("%s: %v", tt.raw, err)
			continue
		}
		if string(got) != tt.want {
			t.Errorf("%s: got %s, want %s", tt.raw, got, tt.want)
		}
	}
}

// provisioned provisions n (a guest module, as LoadModule would).
func provisioned(t *testing.T, n *NATSStorage) *NATSStorage {
	t.Helper()
	if err := n.Provision(caddy.Context{}); err != nil {
		t.Fatalf("provisioning %+v: %v", n, err)
	}
	return n
}

func natsKey(t *testing.T, n *NATSStorage, relayName string) string {
	t.Helper()
	key, err := provisioned(t, n).PoolKey(relayName)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// TestNATSPoolKey: a reload that changes where or how the relay connects
// gets a new engine (it reconnects); one that changes nothing of the
// storage keeps the engine, whatever the order of the URLs. No key holds
// a secret.
func TestNATSPoolKey(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	writeFile(t, ca, "first CA")
	base := func() *NATSStorage {
		return &NATSStorage{URLs: []string{"nats://n2:4222", "nats://n1:4222"}, Token: "tok-secret", TLSCA: ca}
	}
	k0 := natsKey(t, base(), "okhi")
	if !strings.HasPrefix(k0, "nats:nats://n1:4222,nats://n2:4222|WEBHOOK_RELAY_OKHI|") {
		t.Errorf("key %q: want nats:<sorted urls>|<stream>|<digest>", k0)
	}
	if strings.Contains(k0, "tok-secret") {
		t.Errorf("key %q holds the token", k0)
	}
	same := base()
	same.URLs = []string{"nats://n1:4222", "nats://n2:4222"}
	if k := natsKey(t, same, "okhi"); k != k0 {
		t.Errorf("the same settings, URLs in another order: key %q, want %q", k, k0)
	}

	changes := map[string]func(n *NATSStorage){
		"url":             func(n *NATSStorage) { n.URLs = []string{"nats://n1:4222", "nats://n3:4222"} },
		"stream":          func(n *NATSStorage) { n.Stream = "OKHI_V2" },
		"token":           func(n *NATSStorage) { n.Token = "tok-rotated" },
		"credential kind": func(n *NATSStorage) { n.Token, n.User, n.Password = "", "relay", "tok-secret" },
		"replicas":        func(n *NATSStorage) { n.Replicas = 3 },
		"timeout":         func(n *NATSStorage) { n.Timeout = caddy.Duration(time.Second) },
		"connect_timeout": func(n *NATSStorage) { n.ConnectTimeout = caddy.Duration(time.Second) },
		"url user info":   func(n *NATSStorage) { n.URLs = []string{"nats://alice:hunter2@n1:4222", "nats://n2:4222"} },
	}
	for what, change := range changes {
		n := base()
		change(n)
		k := natsKey(t, n, "okhi")
		if k == k0 {
			t.Errorf("a change of %s keeps the key %q", what, k)
		}
		if strings.Contains(k, "hunter2") || strings.Contains(k, "alice") || strings.Contains(k, "tok-") {
			t.Errorf("a change of %s: key %q holds a credential", what, k)
		}
	}
	if k := natsKey(t, base(), "other"); k == k0 {
		t.Errorf("another relay's default stream keeps the key %q", k)
	}
	if n := (&NATSStorage{URLs: []string{"nats://n1:4222"}, Replicas: 1}); natsKey(t, n, "okhi") != natsKey(t, &NATSStorage{URLs: []string{"nats://n1:4222"}}, "okhi") {
		t.Error("replicas 1 and the default (1) have different keys")
	}

	// A renewed file under the same name counts as a change.
	writeFile(t, ca, "renewed CA")
	if k := natsKey(t, base(), "okhi"); k == k0 {
		t.Error("a tls_ca file with new contents keeps the key")
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestNATSStorageCredentials: placeholders are resolved at provision,
// into the store's settings only: the module's JSON (what Caddy saves
// and serves on /config/) keeps the placeholder.
func TestNATSStorageCredentials(t *testing.T) {
	t.Setenv("WEBHOOK_RELAY_TEST_NATS_TOKEN", "tok-from-env")
	pw := filepath.Join(t.TempDir(), "pw")
	writeFile(t, pw, "pw-from-file")

	n := provisioned(t, &NATSStorage{URLs: []string{"nats://n1:4222"}, Token: "{env.WEBHOOK_RELAY_TEST_NATS_TOKEN}"})
	if n.cfg.Token != "tok-from-env" {
		t.Errorf("token resolved to %q, want the environment's", n.cfg.Token)
	}
	u := provisioned(t, &NATSStorage{URLs: []string{"nats://n1:4222"}, User: "relay", Password: "{file." + pw + "}"})
	if u.cfg.User != "relay" || u.cfg.Password != "pw-from-file" {
		t.Errorf("user %q password %q, want relay and the file's contents", u.cfg.User, u.cfg.Password)
	}
	for _, m := range []*NATSStorage{n, u} {
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), "from-env") || strings.Contains(string(b), "from-file") {
			t.Errorf("the module's JSON %s holds a resolved secret", b)
		}
	}
}

// TestNATSStorageProvisionErrors: what a JSON config can get wrong that
// the Caddyfile adapter would have refused, and placeholders.
func TestNATSStorageProvisionErrors(t *testing.T) {
	t.Setenv("WEBHOOK_RELAY_TEST_EMPTY", "")
	missing := filepath.Join(t.TempDir(), "missing.creds")
	tests := []struct {
		name string
		n    NATSStorage
		want []string
	}{
		{"no URL", NATSStorage{}, []string{"storage nats needs at least one URL"}},
		{"http URL", NATSStorage{URLs: []string{"http://n1:4222"}}, []string{"the scheme must be nats, tls, ws or wss"}},
		{"bad stream", NATSStorage{URLs: []string{"nats://n1"}, Stream: "a b"}, []string{`stream name "a b"`}},
		{"replicas", NATSStorage{URLs: []string{"nats://n1"}, Replicas: 6}, []string{"replicas must be 1 to 5, not 6"}},
		{"negative replicas", NATSStorage{URLs: []string{"nats://n1"}, Replicas: -1}, []string{"replicas must be 1 to 5, not -1"}},
		{"two credential kinds", NATSStorage{URLs: []string{"nats://n1"}, Creds: "/x.creds", Token: "t"}, []string{"set one kind of credentials, not creds and token"}},
		{"user without password", NATSStorage{URLs: []string{"nats://n1"}, User: "relay"}, []string{"user and password go together"}},
		{"cert without key", NATSStorage{URLs: []string{"nats://n1"}, TLSClientCert: "/c.pem"}, []string{"tls_client_cert and tls_client_key go together"}},
		{"negative timeout", NATSStorage{URLs: []string{"nats://n1"}, Timeout: -1}, []string{"cannot be negative"}},
		{"empty placeholder", NATSStorage{URLs: []string{"nats://n1"}, Token: "{env.WEBHOOK_RELAY_TEST_EMPTY}"}, []string{"storage nats: token", "WEBHOOK_RELAY_TEST_EMPTY"}},
		{"missing creds file", NATSStorage{URLs: []string{"nats://n1"}, Creds: missing}, []string{"storage nats: reading " + missing}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.n.Provision(caddy.Context{})
			if err == nil {
				t.Fatalf("no error; want one containing %q", tt.want)
			}
			assertContains(t, err.Error(), tt.want...)
		})
	}
}

// TestNATSURLErrorsHidePasswords: a password in a URL never reaches an
// error message (nor, so, a log line).
func TestNATSURLErrorsHidePasswords(t *testing.T) {
	for _, u := range []string{
		"http://alice:hunter2@n1:4222",
		"nats://alice:hunter2@:4222",
		"nats://alice:hunter2@n1:99999",
		"nats://alice:hunter2@n1:4222/%zz",
		"alice:hunter2@n1:4222",
	} {
		err := checkNATSURL(u)
		if err == nil {
			t.Errorf("%s: no error", u)
			continue
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%s: the error %q shows the password", u, err)
		}
	}
	for _, u := range []string{"nats://n1:4222", "tls://n1", "ws://n1:8080", "wss://n1/ws", "nats://alice:hunter2@n1:4222", "nats://[::1]:4222"} {
		if err := checkNATSURL(u); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
}

// relayHandlerJSON is a handler of a JSON config with the given storage.
func relayHandlerJSON(name, storage string) string {
	return fmt.Sprintf(`{"handler":"webhook_relay","name":%q,"auth":{"off":true},"storage":%s,
		"targets":[{"name":"t1","url":"http://127.0.0.1:9/"}]}`, name, storage)
}

func handlersConfig(handlers ...string) string {
	return `{"apps":{"http":{"servers":{"srv0":{"listen":["127.0.0.1:9099"],"routes":[{"handle":[` +
		strings.Join(handlers, ",") + `]}]}}}}}`
}

// TestValidateStorage: JSON configs, of this release and earlier ones,
// through provisioning.
func TestValidateStorage(t *testing.T) {
	dir := t.TempDir()
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	valid := map[string]string{
		"legacy directory":   handlersConfig(relayHandlerJSON("a", q(dir+"/a"))),
		"legacy memory":      handlersConfig(relayHandlerJSON("a", `"memory"`)),
		"legacy empty":       handlersConfig(relayHandlerJSON("a", `""`)),
		"bolt module":        handlersConfig(relayHandlerJSON("a", `{"backend":"bolt","dir":`+q(dir+"/a")+`}`)),
		"memory module":      handlersConfig(relayHandlerJSON("a", `{"backend":"memory"}`)),
		"nats module":        handlersConfig(relayHandlerJSON("a", `{"backend":"nats","urls":["nats://127.0.0.1:1"]}`)),
		"two nats relays":    handlersConfig(relayHandlerJSON("a", `{"backend":"nats","urls":["nats://127.0.0.1:1"]}`), relayHandlerJSON("b", `{"backend":"nats","urls":["nats://127.0.0.1:1"]}`)),
		"legacy and modules": handlersConfig(relayHandlerJSON("a", q(dir+"/a")), relayHandlerJSON("b", `{"backend":"bolt","dir":`+q(dir+"/b")+`}`)),
	}
	for name, config := range valid {
		t.Run(name, func(t *testing.T) {
			if err := caddy.Validate(unmarshalConfig(t, config)); err != nil {
				t.Errorf("validating: %v", err)
			}
		})
	}
	invalid := []struct {
		name   string
		config string
		want   []string
	}{
		{
			name:   "unknown backend",
			config: handlersConfig(relayHandlerJSON("a", `{"backend":"s3"}`)),
			want:   []string{"loading storage", "webhook_relay.storage.s3"},
		},
		{
			name:   "unknown field",
			config: handlersConfig(relayHandlerJSON("a", `{"backend":"bolt","path":"/x"}`)),
			want:   []string{"loading storage", "path"},
		},
		{
			name: "legacy and module form on one directory",
			config: handlersConfig(relayHandlerJSON("a", q(dir+"/same")),
				relayHandlerJSON("b", `{"backend":"bolt","dir":`+q(dir+"/same")+`}`)),
			want: []string{`webhook relays "a" and "b" use the same storage`},
		},
		{
			name: "default streams collide",
			config: handlersConfig(relayHandlerJSON("a.b", `{"backend":"nats","urls":["nats://127.0.0.1:1"]}`),
				relayHandlerJSON("a_b", `{"backend":"nats","urls":["nats://127.0.0.1:2"]}`)),
			want: []string{`webhook relays "a.b" and "a_b" use the same NATS stream WEBHOOK_RELAY_A_B`, "set stream"},
		},
		{
			name: "explicit streams collide",
			config: handlersConfig(relayHandlerJSON("a", `{"backend":"nats","urls":["nats://127.0.0.1:1"],"stream":"S"}`),
				relayHandlerJSON("b", `{"backend":"nats","urls":["nats://127.0.0.1:1"],"stream":"S"}`)),
			want: []string{`webhook relays "a" and "b" use the same NATS stream S`},
		},
		{
			name:   "nats without URL",
			config: handlersConfig(relayHandlerJSON("a", `{"backend":"nats"}`)),
			want:   []string{"storage nats needs at least one URL"},
		},
	}
	for _, tt := range invalid {
		t.Run(tt.name, func(t *testing.T) {
			err := caddy.Validate(unmarshalConfig(t, tt.config))
			if err == nil {
				t.Fatalf("no error; want one containing %q", tt.want)
			}
			assertContains(t, err.Error(), tt.want...)
		})
	}
	if n := engineCount(); n != 0 {
		t.Errorf("%d engines left in the pool after validations", n)
	}
}

func unmarshalConfig(t *testing.T, config string) *caddy.Config {
	t.Helper()
	var cfg caddy.Config
	if err := json.Unmarshal([]byte(config), &cfg); err != nil {
		t.Fatalf("config %s: %v", config, err)
	}
	return &cfg
}

// legacyJSON adapts a site of one relay, then writes its storage as
// releases before storage modules did: a JSON string.
func legacyJSON(t *testing.T, port int, relayName, storage, targetURL string) string {
	t.Helper()
	caddyfile := siteConfig(port, fmt.Sprintf(`
	webhook_relay %s {
		auth_header X-Secret %s
		storage memory
		forward crm %s
	}`, relayName, secret, targetURL))
	raw, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	module := `"storage":{"backend":"memory"}`
	if !strings.Contains(string(raw), module) {
		t.Fatalf("adapted config has no %s: %s", module, raw)
	}
	legacy, err := json.Marshal(storage)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Replace(string(raw), module, `"storage":`+string(legacy), 1)
}

// TestLegacyStorageJSON: a JSON config (autosave.json) that the previous
// release wrote, with storage as a string, loads and keeps its store
// where that release kept it.
func TestLegacyStorageJSON(t *testing.T) {
	const port = 9097
	dir := t.TempDir()
	tests := []struct {
		name, relay, storage, key string
	}{
		{"directory", "legacy-dir", dir, "bolt:" + filepath.Join(dir, "relay.db")},
		{"memory", "legacy-mem", StorageMemory, "memory:legacy-mem"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := newTarget(t, http.StatusOK)
			tester := caddytest.NewTester(t)
			config := legacyJSON(t, port, tt.relay, tt.storage, target.URL)
			tester.InitServer(config, "json")
			if t.Failed() {
				t.FailNow()
			}
			t.Cleanup(func() { stopCaddy(t) })
			url := fmt.Sprintf("http://localhost:%d/", port)
			event := okhiEvent("legacy-"+tt.name, "verified")
			id := ack(t, post(t, tester, url, event), "accepted")
			ack(t, post(t, tester, url, event), "duplicate")
			target.waitDelivered(t, 5*time.Second, id)
			if !poolHas(tt.key) {
				t.Errorf("no engine under %s", tt.key)
			}
			if tt.storage != StorageMemory {
				if _, err := os.Stat(filepath.Join(dir, "relay.db")); err != nil {
					t.Errorf("the store is not where the legacy config put it: %v", err)
				}
			}
		})
	}
}

func poolHas(key string) bool {
	found := false
	engines.Range(func(k, _ any) bool {
		found = k == key
		return !found
	})
	return found
}

// natsDownSite is a site with a relay on a NATS nobody listens on, and
// another route.
func natsDownSite(url, token, header string) string {
	return fmt.Sprintf(`
	route /hook {
		webhook_relay nats-down {
			auth_header X-Secret %s
			storage nats %s {
				token %s
				connect_timeout 200ms
				timeout 500ms
			}
			forward crm http://127.0.0.1:9/ {
				header X-Test %s
			}
		}
	}
	route /health {
		respond "ok" 200
	}`, secret, url, token, header)
}

// TestNATSUnreachable: with NATS down, Caddy starts at once and serves
// its other routes; the relay answers 503 with Retry-After within its
// budget, never 200.
func TestNATSUnreachable(t *testing.T) {
	const port = 9093
	start := time.Now()
	tester := startCaddy(t, siteConfig(port, natsDownSite("nats://127.0.0.1:1", "tok-a", "a")))
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("loading the config took %s with NATS down", d)
	}
	base := fmt.Sprintf("http://localhost:%d", port)
	r := do(t, tester.Client, newRequest(t, http.MethodGet, base+"/health", nil, nil))
	if r.status != http.StatusOK || r.body != "ok" {
		t.Errorf("GET /health: %d %q, want 200 ok", r.status, r.body)
	}
	start = time.Now()
	r = post(t, tester, base+"/hook", okhiEvent("nats-down-1", "verified"))
	if r.status != http.StatusServiceUnavailable {
		t.Errorf("POST with NATS down: %d %q, want 503", r.status, r.body)
	}
	if r.header.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the 503 took %s", d)
	}
	s := scrape(t, tester.Client)
	assertGauge(t, s, "caddy_webhook_relay_store_up", `relay="nats-down"`, 0)
}

// TestNATSReloadEngine: a reload that changes nothing of the storage
// keeps the engine (and its connection); one that changes the URL or
// the credentials gets a new engine, which connects anew.
func TestNATSReloadEngine(t *testing.T) {
	const port = 9092
	tester := startCaddy(t, siteConfig(port, natsDownSite("nats://127.0.0.1:1", "tok-a", "a")))
	first := liveEngine("nats-down")
	if first == nil {
		t.Fatal("no engine after the first load")
	}
	steps := []struct {
		name       string
		site       string
		sameEngine bool
	}{
		{"a target's header changes", natsDownSite("nats://127.0.0.1:1", "tok-a", "b"), true},
		{"the URL changes", natsDownSite("nats://127.0.0.1:2", "tok-a", "b"), false},
		{"the token changes", natsDownSite("nats://127.0.0.1:2", "tok-b", "b"), false},
	}
	prev := first
	for _, st := range steps {
		loadConfig(t, tester, siteConfig(port, st.site))
		e := liveEngine("nats-down")
		if e == nil {
			t.Fatalf("%s: no engine", st.name)
		}
		if (e == prev) != st.sameEngine {
			t.Errorf("%s: same engine %v, want %v", st.name, e == prev, st.sameEngine)
		}
		if !st.sameEngine {
			waitFor(t, 5*time.Second, "the old engine to close", func() bool { return !prev.IsOpen() })
		}
		if n := natsEngines(); n != 1 {
			t.Errorf("%s: %d NATS engines in the pool, want 1", st.name, n)
		}
		prev = e
	}
}

func natsEngines() int {
	n := 0
	engines.Range(func(k, _ any) bool {
		if strings.HasPrefix(k.(string), "nats:") {
			n++
		}
		return true
	})
	return n
}
