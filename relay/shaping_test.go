package relay

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
)

// TestShapedDelivery: one target gets a PUT to a URL built from the
// event, a form body made by a transform, a header from the event and a
// Standard Webhooks signature over the body as sent; the contract's own
// headers are still there.
func TestShapedDelivery(t *testing.T) {
	var mu sync.Mutex
	var got *http.Request
	var body string
	target := newTestTarget(t, func(_ http.ResponseWriter, r *http.Request, _ int) {
		mu.Lock()
		defer mu.Unlock()
		got = r
	})
	const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	tc := fastTarget("crm", target.URL+"/addresses/{event.json.v2.address_verification_id}?status={event.json.v2.verification_status}")
	tc.Method = http.MethodPut
	tc.Transform = `{id: .v2.address_verification_id, status: .v2.verification_status, user: .v2.user_id, extra: null}`
	tc.BodyFormat = BodyForm
	tc.Headers = http.Header{"X-Event": {"{event.id}"}}
	tc.Sign = []string{secret}
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
	id := mustAccept(t, e, `{"v2":{"address_verification_id":"a/b c","verification_status":"verified&more","user_id":"u1","secret_field":"x"}}`)
	waitFor(t, "the delivery", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	reqs := target.requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests, want 1", len(reqs))
	}
	body = string(reqs[0].Body)
	mu.Lock()
	r := got
	mu.Unlock()
	if r.Method != http.MethodPut {
		t.Errorf("method %s, want PUT", r.Method)
	}
	if r.URL.EscapedPath() != "/addresses/a%2Fb%20c" || r.URL.Query().Get("status") != "verified&more" {
		t.Errorf("URL %s: want the id as one path segment and the status as one parameter", r.URL)
	}
	if body != "extra=&id=a%2Fb+c&status=verified%26more&user=u1" {
		t.Errorf("body %q", body)
	}
	h := reqs[0].Header
	if ct := h.Get("Content-Type"); ct != "application/x-www-form-urlencoded" {
		t.Errorf("Content-Type %q", ct)
	}
	if h.Get("X-Event") != id.String() || h.Get(HeaderIdempotencyKey) != id.String() || h.Get(HeaderAttempt) != "1" {
		t.Errorf("headers %v", h)
	}
	key, _ := shape.DecodeSecret(secret)
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(h.Get("Webhook-Id") + "." + h.Get("Webhook-Timestamp") + "." + body))
	if want := "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil)); h.Get("Webhook-Signature") != want {
		t.Errorf("signature %q, want %q", h.Get("Webhook-Signature"), want)
	}
	if h.Get("Webhook-Id") != id.String() {
		t.Errorf("webhook-id %q, want the event id", h.Get("Webhook-Id"))
	}
}

// TestShapingErrorsDeadLetter: a transform that errors, and a header
// value a payload would break with CR/LF, dead-letter that delivery with
// a clear last_error and send nothing; other events and targets go on.
func TestShapingErrorsDeadLetter(t *testing.T) {
	target := newTestTarget(t, nil)
	failing := fastTarget("jq", target.URL)
	failing.Transform = `if .v2.verification_status == "bad" then error("no status for the CRM") else . end`
	hdr := fastTarget("hdr", target.URL)
	hdr.Headers = http.Header{"X-Status": {"{event.json.v2.verification_status}"}}
	e := openEngine(t, Config{Targets: []TargetConfig{failing, hdr}}, Options{OpenStore: memStore()})
	mustAccept(t, e, `{"v2":{"address_verification_id":"1","verification_status":"bad"}}`)
	mustAccept(t, e, `{"v2":{"address_verification_id":"2","verification_status":"ok\r\nX-Evil: 1"}}`)
	mustAccept(t, e, `{"v2":{"address_verification_id":"3","verification_status":"fine"}}`)
	waitFor(t, "every delivery", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	dead := deadLetters(t, e)
	if len(dead) != 2 {
		t.Fatalf("%d dead letters, want 2: %+v", len(dead), dead)
	}
	for _, d := range dead {
		switch d.Target {
		case "jq":
			if !strings.Contains(d.LastError, "no status for the CRM") || d.Attempts != 0 {
				t.Errorf("jq dead letter: last_error %q, attempts %d", d.LastError, d.Attempts)
			}
		case "hdr":
			if !strings.Contains(d.LastError, "X-Status") || d.Attempts != 0 {
				t.Errorf("header dead letter: last_error %q, attempts %d", d.LastError, d.Attempts)
			}
		}
	}
	// Events 2 and 3 at jq, 1 and 3 at hdr.
	if n := target.count(); n != 4 {
		t.Errorf("target got %d requests, want 4", n)
	}
	for _, r := range target.requests() {
		if r.Header.Get("X-Evil") != "" {
			t.Error("a payload added a header")
		}
	}
}

// TestReloadKeepsUnchangedTarget: a reload with the same settings keeps
// the target's pipeline and connections (and its held state); one that
// changes the transform applies from the next attempt on.
func TestReloadKeepsUnchangedTarget(t *testing.T) {
	target := newTestTarget(t, nil)
	tc := fastTarget("t", target.URL)
	tc.Transform = `{v: 1}`
	cfg := Config{Targets: []TargetConfig{tc}}
	e := openEngine(t, cfg, Options{OpenStore: memStore()})
	before := e.targets["t"].cfg.Load()
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	if e.targets["t"].cfg.Load() != before {
		t.Error("an unchanged target got new settings: its pipeline was compiled again")
	}
	tc.Transform = `{v: 2}`
	cfg.Targets = []TargetConfig{tc}
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	now := e.targets["t"].cfg.Load()
	if now == before || now.client != before.client {
		t.Error("a changed transform should rebuild the pipeline and keep the client")
	}
	mustAccept(t, e, v3Body("r1"))
	waitFor(t, "the delivery", 5*time.Second, func() bool { return target.count() == 1 })
	if b := string(target.requests()[0].Body); b != `{"v":2}` {
		t.Errorf("body %s, want the new transform's", b)
	}
	// A bad program leaves the engine as it was.
	tc.Transform = `{v: `
	cfg.Targets = []TargetConfig{tc}
	if err := e.Update(cfg); err == nil {
		t.Error("a transform that does not compile was accepted")
	}
	if e.targets["t"].cfg.Load() != now {
		t.Error("a failed update changed the target")
	}
}
