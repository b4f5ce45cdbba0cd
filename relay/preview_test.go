package relay

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestPreviewIsWhatTheEngineSends: Preview's request is the one a real
// engine sends on its first attempt at the same time, signature included.
func TestPreviewIsWhatTheEngineSends(t *testing.T) {
	target := newTestTarget(t, nil)
	clock := newFakeClock()
	tc := fastTarget("crm", target.URL+"/hooks/{event.json.data.status}?id={event.id}")
	tc.Headers = http.Header{"X-Source": {"okhi"}, "X-Event": {"{event.id}"}}
	tc.Transform = `{id: .event_id, status: .data.status}`
	tc.Sign = []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
	cfg := Config{Targets: []TargetConfig{tc}}
	e := openEngine(t, cfg, Options{OpenStore: memStore(clock.Now), Now: clock.Now})
	body := v3Body("preview")
	mustAccept(t, e, body)
	waitFor(t, "the delivery", 5*time.Second, func() bool { return e.PendingEvents() == 0 })

	p, err := Preview(cfg, "crm", []byte(body), "application/json", clock.Now())
	if err != nil {
		t.Fatal(err)
	}
	got := target.requests()[0]
	if string(got.Body) != string(p.Body) {
		t.Errorf("engine sent %s, Preview %s", got.Body, p.Body)
	}
	sent := got.Header.Clone()
	sent.Del("Content-Length") // net/http's, not the relay's
	if len(sent) != len(p.Header) {
		t.Errorf("engine sent headers %v, Preview %v", sent, p.Header)
	}
	for k, v := range p.Header {
		if strings.Join(sent[k], ",") != strings.Join(v, ",") {
			t.Errorf("%s: engine sent %q, Preview %q", k, sent[k], v)
		}
	}
	if !strings.HasSuffix(p.URL, "/hooks/verified?id="+cfgEventID(t, cfg, body)) {
		t.Errorf("Preview URL %s", p.URL)
	}

	if _, err := Preview(cfg, "nope", []byte(body), "application/json", clock.Now()); err == nil || !strings.Contains(err.Error(), "its targets: crm") {
		t.Errorf("unknown target: %v", err)
	}
}

func cfgEventID(t *testing.T, cfg Config, body string) string {
	t.Helper()
	cfg, err := cfg.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	return cfg.EventID([]byte(body)).String()
}
