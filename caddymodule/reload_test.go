package caddymodule

import (
	"bytes"
	"fmt"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

// TestReloadKeepsPendingDeliveries: events owed to a target that is down
// survive a reload that changes the config; once the target is back each
// is delivered exactly once, and a target added by the reload gets only
// the events received after it.
func TestReloadKeepsPendingDeliveries(t *testing.T) {
	const port = 9086
	crm := newTarget(t, http.StatusServiceUnavailable)
	audit := newTarget(t, http.StatusOK)
	storage := t.TempDir()
	before := siteConfig(port, fmt.Sprintf(`
	webhook_relay reload {
		auth_header X-Secret %s
		storage %s
		forward crm %s {
			timeout 10s
			backoff 20ms 100ms
		}
	}`, secret, storage, crm.URL))
	after := siteConfig(port, fmt.Sprintf(`
	webhook_relay reload {
		auth_header X-Secret %s
		storage %s
		forward crm %s {
			timeout 3s
			backoff 20ms 100ms
		}
		forward audit %s
	}`, secret, storage, crm.URL, audit.URL))
	tester := startCaddy(t, before)
	url := fmt.Sprintf("http://localhost:%d/", port)

	var old, all []string
	for i := range 5 {
		old = append(old, ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("before-%d", i), "verified")), "accepted"))
	}
	waitFor(t, 5*time.Second, "a failed attempt at crm", func() bool { return len(crm.requests()) > 0 })

	loadConfig(t, tester, after)
	var fresh []string
	for i := range 2 {
		fresh = append(fresh, ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("after-%d", i), "verified")), "accepted"))
	}
	for _, id := range old {
		// The reloaded relay still knows the old events.
		if got := ack(t, post(t, tester, url, okhiEventBody(t, id, old)), "duplicate"); got != id {
			t.Errorf("duplicate of %s answered event_id %s", id, got)
		}
	}
	audit.waitDelivered(t, 5*time.Second, fresh...)

	crm.status.Store(http.StatusOK)
	all = append(append(all, old...), fresh...)
	crm.waitDelivered(t, 10*time.Second, all...)
	waitFor(t, 5*time.Second, "nothing pending", func() bool {
		s, ok := targetStats(t, tester.Client, "reload", "crm")
		return ok && s.Pending == 0
	})
	assertDeliveredOnce(t, "crm", crm, all)
	assertDeliveredOnce(t, "audit", audit, fresh)
}

// okhiEventBody returns the body of the i-th "before-<i>" event whose id
// is id, so that the test can send it again.
func okhiEventBody(t *testing.T, id string, ids []string) string {
	t.Helper()
	for i, v := range ids {
		if v == id {
			return okhiEvent(fmt.Sprintf("before-%d", i), "verified")
		}
	}
	t.Fatalf("unknown event %s", id)
	return ""
}

// TestReloadRemovingTarget: what a removed target still owed becomes dead
// letters ("target removed from config"), listed by the admin API and
// replayable once the target is back under the same name.
func TestReloadRemovingTarget(t *testing.T) {
	const port = 9087
	crm := newTarget(t, http.StatusServiceUnavailable)
	audit := newTarget(t, http.StatusOK)
	storage := t.TempDir()
	both := siteConfig(port, fmt.Sprintf(`
	webhook_relay removal {
		auth_header X-Secret %s
		storage %s
		forward crm %s {
			backoff 20ms 100ms
		}
		forward audit %s
	}`, secret, storage, crm.URL, audit.URL))
	auditOnly := siteConfig(port, fmt.Sprintf(`
	webhook_relay removal {
		auth_header X-Secret %s
		storage %s
		forward audit %s
	}`, secret, storage, audit.URL))
	tester := startCaddy(t, both)
	url := fmt.Sprintf("http://localhost:%d/", port)

	var ids []string
	for i := range 3 {
		ids = append(ids, ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("rm-%d", i), "verified")), "accepted"))
	}
	audit.waitDelivered(t, 5*time.Second, ids...)

	loadConfig(t, tester, auditOnly)
	dead, _ := allDeadLetters(t, tester.Client, "removal", "", 100)
	if len(dead) != len(ids) {
		t.Fatalf("%d dead letters, want %d: %+v", len(dead), len(ids), dead)
	}
	got := map[string]bool{}
	for _, d := range dead {
		got[d.EventID] = true
		if d.Target != "crm" || d.LastError != relay.ReasonTargetRemoved {
			t.Errorf("dead letter %s at %q with last_error %q, want crm and %q", d.EventID, d.Target, d.LastError, relay.ReasonTargetRemoved)
		}
	}
	for _, id := range ids {
		if !got[id] {
			t.Errorf("event %s is not a dead letter", id)
		}
	}
	if s, ok := targetStats(t, tester.Client, "removal", "crm"); !ok || s.Configured || s.DeadLetters != 3 || s.Pending != 0 {
		t.Errorf("overview of crm: %+v (listed: %v), want unconfigured with 3 dead letters", s, ok)
	}
	// While crm is not configured, there is nothing to replay it to.
	var rep struct{ Replayed int }
	if r := admin(t, tester.Client, http.MethodPost, "/webhook_relay/removal/dead_letters/replay", `{}`, &rep); r.status != 200 || rep.Replayed != 0 {
		t.Errorf("replay without crm: %d %q, want 200 and 0 replayed", r.status, r.body)
	}

	crm.status.Store(http.StatusOK)
	loadConfig(t, tester, both)
	if r := admin(t, tester.Client, http.MethodPost, "/webhook_relay/removal/dead_letters/replay", `{"target":"crm"}`, &rep); r.status != 200 || rep.Replayed != 3 {
		t.Fatalf("replay: %d %q, want 3 replayed", r.status, r.body)
	}
	crm.waitDelivered(t, 5*time.Second, ids...)
	assertDeliveredOnce(t, "crm", crm, ids)
	assertDeliveredOnce(t, "audit", audit, ids)
}

// TestFailedReloadLeavesRelayUnchanged: a reload whose config fails
// (here: another relay's secret is an empty placeholder) keeps the
// running config, so it must not have changed the running relay either.
func TestFailedReloadLeavesRelayUnchanged(t *testing.T) {
	const port = 9091
	t.Setenv("WEBHOOK_RELAY_TEST_EMPTY", "")
	crm := newTarget(t, http.StatusServiceUnavailable)
	other := newTarget(t, http.StatusOK)
	storage := t.TempDir()
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay failed {
		auth_header X-Secret %s
		storage %s
		forward crm %s {
			backoff 1m 1m
		}
	}`, secret, storage, crm.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)
	for i := range 2 {
		ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("f-%d", i), "verified")), "accepted")
	}

	bad := siteConfig(port, fmt.Sprintf(`
	route /a {
		webhook_relay failed {
			auth_header X-Secret %s
			storage %s
			forward other %s
		}
	}
	route /b {
		webhook_relay broken {
			auth_header X-Secret {env.WEBHOOK_RELAY_TEST_EMPTY}
			storage %s
			forward other %s
		}
	}`, secret, storage, other.URL, t.TempDir(), other.URL))
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(bad), nil)
	if err != nil {
		t.Fatal(err)
	}
	r := do(t, tester.Client, newRequest(t, http.MethodPost, adminURL+"/load", bytes.NewReader(adapted), http.Header{"Content-Type": {"application/json"}}))
	if r.status == http.StatusOK {
		t.Fatal("the broken config loaded")
	}
	assertContains(t, r.body, "is empty")

	if refs, ok := engines.References("bolt:" + filepath.Join(storage, "relay.db")); !ok || refs != 1 {
		t.Errorf("engine references after the failed reload: %d (in pool: %v), want 1", refs, ok)
	}
	if n := engineCount(); n != 1 {
		t.Errorf("%d engines in the pool after the failed reload, want 1", n)
	}
	s, ok := targetStats(t, tester.Client, "failed", "crm")
	if !ok || !s.Configured || s.Pending != 2 || s.DeadLetters != 0 {
		t.Errorf("crm after the failed reload: %+v (listed: %v), want configured with 2 pending", s, ok)
	}
	if _, ok := targetStats(t, tester.Client, "failed", "other"); ok {
		t.Error("the failed config's target runs in the live relay")
	}
	ack(t, post(t, tester, url, okhiEvent("f-after", "verified")), "accepted")
	if n := len(other.requests()); n != 0 {
		t.Errorf("the failed config's target got %d requests", n)
	}
}

// TestMemoryStorage: a memory store is shared across reloads like a file
// store (pending events survive them), but not across a stop.
func TestMemoryStorage(t *testing.T) {
	const port = 9094
	target := newTarget(t, http.StatusServiceUnavailable)
	config := func(timeout string) string {
		return siteConfig(port, fmt.Sprintf(`
	webhook_relay mem {
		auth_header X-Secret %s
		storage memory
		forward crm %s {
			timeout %s
			backoff 20ms 100ms
		}
	}`, secret, target.URL, timeout))
	}
	tester := startCaddy(t, config("10s"))
	url := fmt.Sprintf("http://localhost:%d/", port)

	event := okhiEvent("mem-1", "verified")
	id := ack(t, post(t, tester, url, event), "accepted")
	waitFor(t, 5*time.Second, "a failed attempt", func() bool { return len(target.requests()) > 0 })

	loadConfig(t, tester, config("5s"))
	ack(t, post(t, tester, url, event), "duplicate")
	target.status.Store(http.StatusOK)
	target.waitDelivered(t, 5*time.Second, id)
	assertDeliveredOnce(t, "crm", target, []string{id})

	stopCaddy(t)
	if _, ok := engines.References("memory:mem"); ok {
		t.Fatal("the memory engine outlived the last config using it")
	}
	loadConfig(t, tester, config("5s"))
	if got := ack(t, post(t, tester, url, event), "accepted"); got != id {
		t.Errorf("event_id after restart %s, want the same %s", got, id)
	}
}
