package caddymodule

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// inspectConfig is a relay whose targets show every state: crm delivers,
// legacy answers 503 and retries in an hour (pending), audit answers 400
// (dead), picky takes only another status (not routed).
func inspectConfig(port int, dir string, crm, legacy, audit *fakeTarget, extra string) string {
	return siteConfig(port, fmt.Sprintf(`
	webhook_relay insp {
		auth_header X-Secret %s
		storage %s
		forward crm %s {
			%s
		}
		forward legacy %s {
			backoff 1h 1h
		}
		forward audit %s
		forward picky %s {
			match data.address_verification.status other
		}
	}`, secret, dir, crm.URL, extra, legacy.URL, audit.URL, crm.URL))
}

// pendingEntry is one entry of GET /webhook_relay/<name>/pending.
type pendingEntry struct {
	EventID        string  `json:"event_id"`
	Target         string  `json:"target"`
	Attempts       int     `json:"attempts"`
	LastError      string  `json:"last_error"`
	LastStatus     int     `json:"last_status"`
	ReceivedAt     string  `json:"received_at"`
	FirstAttemptAt *string `json:"first_attempt_at"`
	LastAttemptAt  *string `json:"last_attempt_at"`
	NextAttemptAt  *string `json:"next_attempt_at"`
}

type pendingPage struct {
	Pending    []pendingEntry `json:"pending"`
	NextCursor *string        `json:"next_cursor"`
}

// eventAnswer is the answer of GET /webhook_relay/<name>/events/<id>.
type eventAnswer struct {
	EventID    string  `json:"event_id"`
	BodyKept   bool    `json:"body_kept"`
	ReceivedAt *string `json:"received_at"`
	Body       *string `json:"body"`
	Targets    []struct {
		Target        string  `json:"target"`
		Configured    bool    `json:"configured"`
		State         string  `json:"state"`
		Attempts      *int    `json:"attempts"`
		LastError     string  `json:"last_error"`
		LastStatus    int     `json:"last_status"`
		NextAttemptAt *string `json:"next_attempt_at"`
	} `json:"targets"`
}

func getEvent(t *testing.T, c *http.Client, relayName, id string) eventAnswer {
	t.Helper()
	var ev eventAnswer
	path := "/webhook_relay/" + relayName + "/events/" + id
	if r := admin(t, c, http.MethodGet, path, "", &ev); r.status != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, r.status, r.body)
	}
	return ev
}

// postEvents sends n events and returns their ids and bodies.
func postEvents(t *testing.T, tester *caddytest.Tester, url, prefix string, n int) (ids []string, bodies map[string]string) {
	t.Helper()
	bodies = map[string]string{}
	for i := range n {
		body := okhiEvent(fmt.Sprintf("%s-%d", prefix, i), "verified")
		id := ack(t, post(t, tester, url, body), "accepted")
		ids = append(ids, id)
		bodies[id] = body
	}
	return ids, bodies
}

// TestAdminInspect drives the routes that show and steer a relay through
// a real Caddy: pending deliveries, one event at every target, pause and
// resume (lasting across a reload), bulk delete, and their errors.
func TestAdminInspect(t *testing.T) {
	const port = 9171
	crm := newTarget(t, http.StatusOK)
	legacy := newTarget(t, http.StatusServiceUnavailable)
	audit := newTarget(t, http.StatusBadRequest)
	dir := t.TempDir()
	tester := startCaddy(t, inspectConfig(port, dir, crm, legacy, audit, ""))
	c := tester.Client
	site := fmt.Sprintf("http://localhost:%d/", port)
	ids, bodies := postEvents(t, tester, site, "insp", 3)
	crm.waitDelivered(t, 5*time.Second, ids...)
	waitFor(t, 5*time.Second, "3 dead letters at audit and an attempt of each at legacy", func() bool {
		a, _ := targetStats(t, c, "insp", "audit")
		return a.DeadLetters == 3 && legacy.arrived.Load() == 3
	})

	t.Run("pending", func(t *testing.T) {
		var all []pendingEntry
		cursor := ""
		for pages := 0; ; pages++ {
			var p pendingPage
			path := "/webhook_relay/insp/pending?limit=2&cursor=" + url.QueryEscape(cursor)
			if r := admin(t, c, http.MethodGet, path, "", &p); r.status != http.StatusOK || p.NextCursor == nil {
				t.Fatalf("GET %s: %d %s", path, r.status, r.body)
			}
			if len(p.Pending) > 2 || pages > 10 {
				t.Fatalf("GET %s: %d entries on page %d", path, len(p.Pending), pages)
			}
			all = append(all, p.Pending...)
			if *p.NextCursor == "" {
				break
			}
			cursor = *p.NextCursor
		}
		if len(all) != 3 {
			t.Fatalf("%d pending, want the 3 at legacy: %+v", len(all), all)
		}
		for _, p := range all {
			if p.Target != "legacy" || bodies[p.EventID] == "" {
				t.Errorf("pending %s at %s, want legacy's", p.EventID, p.Target)
			}
			if p.Attempts != 1 || p.LastStatus != http.StatusServiceUnavailable || !strings.Contains(p.LastError, "503") {
				t.Errorf("%s: attempts %d, status %d, error %q; want 1, 503 and an error naming it", p.EventID, p.Attempts, p.LastStatus, p.LastError)
			}
			if p.NextAttemptAt == nil || p.FirstAttemptAt == nil || p.LastAttemptAt == nil {
				t.Fatalf("%s: a null time: %+v", p.EventID, p)
			}
			if next, err := time.Parse(time.RFC3339Nano, *p.NextAttemptAt); err != nil || time.Until(next) < 30*time.Minute {
				t.Errorf("%s: next_attempt_at %q, want about an hour from now (%v)", p.EventID, *p.NextAttemptAt, err)
			}
		}
		var one pendingPage
		if r := admin(t, c, http.MethodGet, "/webhook_relay/insp/pending?target=crm", "", &one); r.status != http.StatusOK || len(one.Pending) != 0 {
			t.Errorf("pending at crm: %d %s, want none", r.status, r.body)
		}
	})

	t.Run("event", func(t *testing.T) {
		ev := getEvent(t, c, "insp", ids[0])
		if ev.EventID != ids[0] || !ev.BodyKept || ev.Body == nil || *ev.Body != bodies[ids[0]] || ev.ReceivedAt == nil {
			t.Errorf("event %+v, want its id, body and receipt time", ev)
		}
		want := map[string]string{"crm": "delivered", "legacy": "pending", "audit": "dead", "picky": "not_routed"}
		if len(ev.Targets) != len(want) {
			t.Errorf("%d targets, want %d", len(ev.Targets), len(want))
		}
		for _, et := range ev.Targets {
			if et.State != want[et.Target] || !et.Configured {
				t.Errorf("%s: %q (configured %v), want %q", et.Target, et.State, et.Configured, want[et.Target])
			}
			switch et.Target {
			case "legacy":
				if et.Attempts == nil || *et.Attempts != 1 || et.NextAttemptAt == nil || et.LastStatus != 503 {
					t.Errorf("legacy: %+v, want 1 attempt, status 503 and a next attempt", et)
				}
			case "audit":
				if et.Attempts == nil || !strings.Contains(et.LastError, "400") || et.NextAttemptAt != nil {
					t.Errorf("audit: %+v, want its error and no next attempt", et)
				}
			default:
				if et.Attempts != nil {
					t.Errorf("%s: attempts %d for a settled state", et.Target, *et.Attempts)
				}
			}
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		var ans struct {
			Target string `json:"target"`
			Paused bool   `json:"paused"`
		}
		if r := admin(t, c, http.MethodPost, "/webhook_relay/insp/targets/crm/pause", "", &ans); r.status != http.StatusOK || !ans.Paused || ans.Target != "crm" {
			t.Fatalf("pause: %d %s", r.status, r.body)
		}
		if s, _ := targetStats(t, c, "insp", "crm"); !s.Paused {
			t.Errorf("overview: crm %+v, want paused", s)
		}
		if s, _ := targetStats(t, c, "insp", "audit"); s.Paused {
			t.Errorf("overview: audit %+v, want not paused", s)
		}
		// A reload that changes the paused target keeps it paused.
		loadConfig(t, tester, inspectConfig(port, dir, crm, legacy, audit, "header X-Reloaded yes"))
		waitFor(t, 5*time.Second, "crm paused after the reload", func() bool {
			s, ok := targetStats(t, c, "insp", "crm")
			return ok && s.Paused
		})
		held, _ := postEvents(t, tester, site, "held", 2)
		waitFor(t, 5*time.Second, "the held events dead at audit", func() bool {
			a, _ := targetStats(t, c, "insp", "audit")
			return a.DeadLetters == 5
		})
		if got := crm.delivered(); got[held[0]]+got[held[1]] != 0 {
			t.Fatalf("paused crm got %v", got)
		}
		for _, et := range getEvent(t, c, "insp", held[0]).Targets {
			if et.Target == "crm" && (et.State != "pending" || et.Attempts == nil || *et.Attempts != 0) {
				t.Errorf("held event at crm: %+v, want pending with no attempt", et)
			}
		}
		if s, _ := targetStats(t, c, "insp", "crm"); s.Pending != 2 || !s.Paused {
			t.Errorf("crm: %+v, want paused with 2 pending", s)
		}
		if r := admin(t, c, http.MethodPost, "/webhook_relay/insp/targets/crm/resume", "", &ans); r.status != http.StatusOK || ans.Paused {
			t.Fatalf("resume: %d %s", r.status, r.body)
		}
		crm.waitDelivered(t, 5*time.Second, held...)
		for _, r := range crm.requests() {
			if key := r.header.Get("Idempotency-Key"); (key == held[0] || key == held[1]) && r.header.Get("X-Reloaded") != "yes" {
				t.Errorf("held event %s went out without the reloaded header", key)
			}
		}
		if s, _ := targetStats(t, c, "insp", "crm"); s.Paused {
			t.Errorf("crm %+v still paused after resume", s)
		}
	})

	t.Run("bulk delete", func(t *testing.T) {
		var v map[string]int
		for _, tt := range []struct {
			body string
			want int
		}{
			{`{"event_ids":["` + ids[0] + `"]}`, 1},
			{`{"event_ids":[]}`, 0},
			{`{"target":"audit","event_ids":["` + ids[1] + `"]}`, 1},
			{`{"target":"crm"}`, 0},
			{`{}`, 3},
			{`{}`, 0},
		} {
			r := admin(t, c, http.MethodPost, "/webhook_relay/insp/dead_letters/delete", tt.body, &v)
			if r.status != http.StatusOK || len(v) != 1 || v["deleted"] != tt.want {
				t.Errorf("delete %s: %d %s, want deleted %d", tt.body, r.status, r.body, tt.want)
			}
		}
		if all, _ := allDeadLetters(t, c, "insp", "", 100); len(all) != 0 {
			t.Errorf("%d dead letters left", len(all))
		}
	})

	t.Run("errors", func(t *testing.T) {
		unknown := strings.Repeat("ab", 16)
		for _, tt := range []struct {
			method, path, body string
			want               int
		}{
			{http.MethodGet, "/webhook_relay/nope/pending", "", http.StatusNotFound},
			{http.MethodGet, "/webhook_relay/insp/pending?target=nope", "", http.StatusNotFound},
			{http.MethodGet, "/webhook_relay/insp/pending?limit=0", "", http.StatusBadRequest},
			{http.MethodGet, "/webhook_relay/insp/pending?limit=x", "", http.StatusBadRequest},
			{http.MethodGet, "/webhook_relay/insp/pending?cursor=garbage", "", http.StatusBadRequest},
			{http.MethodPost, "/webhook_relay/insp/pending", "", http.StatusMethodNotAllowed},
			{http.MethodGet, "/webhook_relay/insp/events/not-an-id", "", http.StatusBadRequest},
			{http.MethodGet, "/webhook_relay/insp/events/" + unknown, "", http.StatusNotFound},
			{http.MethodGet, "/webhook_relay/nope/events/" + unknown, "", http.StatusNotFound},
			{http.MethodDelete, "/webhook_relay/insp/events/" + ids[0], "", http.StatusMethodNotAllowed},
			{http.MethodPost, "/webhook_relay/insp/targets/nope/pause", "", http.StatusNotFound},
			{http.MethodPost, "/webhook_relay/insp/targets/crm/stop", "", http.StatusNotFound},
			{http.MethodGet, "/webhook_relay/insp/targets/crm/pause", "", http.StatusMethodNotAllowed},
			{http.MethodPost, "/webhook_relay/nope/targets/crm/pause", "", http.StatusNotFound},
			{http.MethodPost, "/webhook_relay/insp/dead_letters/delete", `{"event_ids":["x"]}`, http.StatusBadRequest},
			{http.MethodPost, "/webhook_relay/insp/dead_letters/delete", `{"ids":[]}`, http.StatusBadRequest},
			{http.MethodPost, "/webhook_relay/nope/dead_letters/delete", `{}`, http.StatusNotFound},
		} {
			r := admin(t, c, tt.method, tt.path, tt.body, nil)
			if r.status != tt.want {
				t.Errorf("%s %s %s: %d %q, want %d", tt.method, tt.path, tt.body, r.status, r.body, tt.want)
			}
			if !strings.Contains(r.body, `"error"`) {
				t.Errorf("%s %s: answer %q, want a JSON error", tt.method, tt.path, r.body)
			}
		}
	})
}
