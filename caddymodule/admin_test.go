package caddymodule

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestAdminDeadLetters drives the admin API: listing and paging dead
// letters, deleting them, replaying them, the overview, and its errors.
// Both targets answer 400 at first, so every event is dead-lettered at
// once at both.
func TestAdminDeadLetters(t *testing.T) {
	const port = 9088
	crm := newTarget(t, http.StatusBadRequest)
	audit := newTarget(t, http.StatusBadRequest)
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay dl {
		auth_header X-Secret %s
		storage %s
		forward crm %s
		forward audit %s
	}`, secret, t.TempDir(), crm.URL, audit.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)
	c := tester.Client

	bodies := map[string]string{}
	var ids []string
	for i := range 3 {
		body := okhiEvent(fmt.Sprintf("dl-%d", i), "verified")
		id := ack(t, post(t, tester, url, body), "accepted")
		ids = append(ids, id)
		bodies[id] = body
	}
	waitFor(t, 5*time.Second, "6 dead letters", func() bool {
		a, okA := targetStats(t, c, "dl", "audit")
		b, okB := targetStats(t, c, "dl", "crm")
		return okA && okB && a.DeadLetters == 3 && b.DeadLetters == 3
	})

	t.Run("overview", func(t *testing.T) {
		var o overview
		if r := admin(t, c, http.MethodGet, "/webhook_relay/", "", &o); r.status != http.StatusOK {
			t.Fatalf("GET /webhook_relay/: %d %q", r.status, r.body)
		}
		if len(o.Relays) != 1 || o.Relays[0].Name != "dl" {
			t.Fatalf("overview lists %+v, want only relay dl", o.Relays)
		}
		if o.Relays[0].PendingEvents != 0 {
			t.Errorf("pending_events %d, want 0 (dead letters do not count)", o.Relays[0].PendingEvents)
		}
		for _, ts := range o.Relays[0].Targets {
			if !ts.Configured || ts.Pending != 0 || ts.DeadLetters != 3 {
				t.Errorf("target %+v, want configured with 0 pending and 3 dead letters", ts)
			}
		}
	})

	t.Run("list with paging", func(t *testing.T) {
		all, pages := allDeadLetters(t, c, "dl", "", 2)
		if len(all) != 6 || pages < 3 {
			t.Fatalf("%d dead letters in %d pages, want 6 in at least 3 pages of 2", len(all), pages)
		}
		pairs := map[string]bool{}
		for _, d := range all {
			pair := d.EventID + "@" + d.Target
			if pairs[pair] {
				t.Errorf("%s listed twice", pair)
			}
			pairs[pair] = true
			if bodies[d.EventID] == "" || (d.Target != "crm" && d.Target != "audit") {
				t.Errorf("unexpected dead letter %s", pair)
			}
			if d.Body != bodies[d.EventID] {
				t.Errorf("%s: body %q, want the event's %q", pair, d.Body, bodies[d.EventID])
			}
			if d.Attempts != 1 || d.LastStatus != http.StatusBadRequest || !strings.Contains(d.LastError, "400") {
				t.Errorf("%s: attempts %d, last_status %d, last_error %q; want 1, 400 and an error naming 400",
					pair, d.Attempts, d.LastStatus, d.LastError)
			}
			for name, v := range map[string]*string{"received_at": &d.ReceivedAt, "first_attempt_at": d.FirstAttemptAt, "last_attempt_at": d.LastAttemptAt} {
				if v == nil {
					t.Errorf("%s: %s is null", pair, name)
					continue
				}
				if ts, err := time.Parse(time.RFC3339Nano, *v); err != nil || time.Since(ts) > time.Minute || time.Since(ts) < 0 {
					t.Errorf("%s: %s %q is not a recent RFC 3339 time (%v)", pair, name, *v, err)
				}
			}
		}
	})

	t.Run("list one target", func(t *testing.T) {
		all, _ := allDeadLetters(t, c, "dl", "&target=audit", 100)
		if len(all) != 3 {
			t.Fatalf("%d dead letters at audit, want 3", len(all))
		}
		for _, d := range all {
			if d.Target != "audit" {
				t.Errorf("dead letter of %s at %s listed under target=audit", d.EventID, d.Target)
			}
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, tt := range []struct {
			method, path, body string
			want               int
		}{
			{http.MethodGet, "/webhook_relay/nope/dead_letters", "", http.StatusNotFound},
			{http.MethodPost, "/webhook_relay/nope/dead_letters/replay", `{}`, http.StatusNotFound},
			{http.MethodGet, "/webhook_relay/dl/elsewhere", "", http.StatusNotFound},
			{http.MethodDelete, "/webhook_relay/dl/dead_letters/not-an-id", "", http.StatusBadRequest},
			{http.MethodDelete, "/webhook_relay/dl/dead_letters/" + strings.Repeat("z", 32), "", http.StatusBadRequest},
			{http.MethodPost, "/webhook_relay/dl/dead_letters/replay", `{"event_ids":["xyz"]}`, http.StatusBadRequest},
			{http.MethodPost, "/webhook_relay/dl/dead_letters/replay", `{"ids":[]}`, http.StatusBadRequest},
			{http.MethodPost, "/webhook_relay/dl/dead_letters/replay", `not json`, http.StatusBadRequest},
			{http.MethodGet, "/webhook_relay/dl/dead_letters?limit=0", "", http.StatusBadRequest},
			{http.MethodGet, "/webhook_relay/dl/dead_letters?limit=ten", "", http.StatusBadRequest},
			{http.MethodPut, "/webhook_relay/dl/dead_letters", "", http.StatusMethodNotAllowed},
			{http.MethodPost, "/webhook_relay/", "", http.StatusMethodNotAllowed},
		} {
			r := admin(t, c, tt.method, tt.path, tt.body, nil)
			if r.status != tt.want {
				t.Errorf("%s %s %s: %d %q, want %d", tt.method, tt.path, tt.body, r.status, r.body, tt.want)
			}
		}
		// Nothing was changed by the failed requests.
		if all, _ := allDeadLetters(t, c, "dl", "", 100); len(all) != 6 {
			t.Errorf("%d dead letters after failed requests, want 6", len(all))
		}
	})

	var del struct{ Deleted int }
	var rep struct{ Replayed int }
	expect := func(t *testing.T, method, path, body string, out *int, want int) {
		t.Helper()
		var v map[string]int
		r := admin(t, c, method, path, body, &v)
		if r.status != http.StatusOK {
			t.Fatalf("%s %s %s: %d %q", method, path, body, r.status, r.body)
		}
		if len(v) != 1 {
			t.Fatalf("%s %s %s: answer %q, want one field", method, path, body, r.body)
		}
		for _, n := range v {
			*out = n
		}
		if *out != want {
			t.Errorf("%s %s %s: %q, want %d", method, path, body, r.body, want)
		}
	}

	t.Run("delete", func(t *testing.T) {
		expect(t, http.MethodDelete, "/webhook_relay/dl/dead_letters/"+ids[2]+"?target=audit", "", &del.Deleted, 1)
		expect(t, http.MethodDelete, "/webhook_relay/dl/dead_letters/"+ids[2]+"?target=audit", "", &del.Deleted, 0)
		expect(t, http.MethodDelete, "/webhook_relay/dl/dead_letters/"+ids[2], "", &del.Deleted, 1)
		if all, _ := allDeadLetters(t, c, "dl", "", 100); len(all) != 4 {
			t.Errorf("%d dead letters after deleting 2, want 4", len(all))
		}
	})

	crm.status.Store(http.StatusOK)
	audit.status.Store(http.StatusOK)

	t.Run("replay", func(t *testing.T) {
		expect(t, http.MethodPost, "/webhook_relay/dl/dead_letters/replay", `{"event_ids":["`+ids[0]+`"]}`, &rep.Replayed, 2)
		crm.waitDelivered(t, 5*time.Second, ids[0])
		audit.waitDelivered(t, 5*time.Second, ids[0])

		expect(t, http.MethodPost, "/webhook_relay/dl/dead_letters/replay", `{"target":"crm"}`, &rep.Replayed, 1)
		crm.waitDelivered(t, 5*time.Second, ids[1])
		if audit.delivered()[ids[1]] != 0 {
			t.Errorf("replay of target crm delivered %s to audit", ids[1])
		}

		expect(t, http.MethodPost, "/webhook_relay/dl/dead_letters/replay", `{}`, &rep.Replayed, 1)
		audit.waitDelivered(t, 5*time.Second, ids[1])

		expect(t, http.MethodPost, "/webhook_relay/dl/dead_letters/replay", `{}`, &rep.Replayed, 0)
		expect(t, http.MethodPost, "/webhook_relay/dl/dead_letters/replay", `{"event_ids":[]}`, &rep.Replayed, 0)
		waitFor(t, 5*time.Second, "no dead letters and nothing pending", func() bool {
			a, _ := targetStats(t, c, "dl", "audit")
			b, _ := targetStats(t, c, "dl", "crm")
			return a.DeadLetters+a.Pending+b.DeadLetters+b.Pending == 0
		})
		if all, _ := allDeadLetters(t, c, "dl", "", 100); len(all) != 0 {
			t.Errorf("%d dead letters left, want 0", len(all))
		}
		// The deleted event was never delivered.
		assertDeliveredOnce(t, "crm", crm, ids[:2])
		assertDeliveredOnce(t, "audit", audit, ids[:2])
	})
}
