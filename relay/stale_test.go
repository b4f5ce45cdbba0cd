package relay

import (
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func statusBody(event, address string, at any) string {
	ts := ""
	switch v := at.(type) {
	case string:
		ts = fmt.Sprintf(`,"event_timestamp":%q`, v)
	case int:
		ts = fmt.Sprintf(`,"event_timestamp":%d`, v)
	}
	return fmt.Sprintf(`{"event_id":%q,"api_version":"v3","data":{"location":{"id":%q}}%s}`, event, address, ts)
}

// TestDropStale: per key, an event older than one already delivered is
// not sent, counted stale, and leaves nothing pending or dead; equal
// times, events without a time or key, and other keys are sent; the
// newest time survives a restart and expires with the dedupe ttl.
func TestDropStale(t *testing.T) {
	target := newTestTarget(t, nil)
	clock := newFakeClock()
	path := tempBolt(t)
	tc := fastTarget("t", target.URL)
	tc.DropStale = &DropStale{KeyPath: "data.location.id", TimePath: "event_timestamp"}
	cfg := Config{Targets: []TargetConfig{tc}, Dedupe: DedupeConfig{TTL: time.Hour}}
	e, err := New(cfg, Options{OpenStore: boltStore(path, clock.Now), Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Open(); err != nil {
		t.Fatal(err)
	}
	stale := e.m.Deliveries.WithLabelValues("default", "t", "stale")
	base := testutil.ToFloat64(stale)
	deliver := func(e *Engine, body string, sent bool) {
		t.Helper()
		before := target.count()
		mustAccept(t, e, body)
		wake(e)
		waitFor(t, "the delivery of "+body, 5*time.Second, func() bool { return e.PendingEvents() == 0 })
		if got := target.count() - before; got != map[bool]int{true: 1, false: 0}[sent] {
			t.Errorf("%s: target got %d requests, want sent=%v", body, got, sent)
		}
	}
	deliver(e, statusBody("1", "A", 200), true)
	deliver(e, statusBody("2", "A", 100), false) // older than 200
	deliver(e, statusBody("3", "A", 200), true)  // equal: sent
	deliver(e, statusBody("4", "A", nil), true)  // no time
	deliver(e, statusBody("5", "B", 50), true)   // another key
	deliver(e, statusBody("6", "A", "1970-01-01T00:02:30Z"), false)
	deliver(e, statusBody("7", "A", "1970-01-01T00:05:00.5Z"), true) // 300.5 s: newest now
	deliver(e, statusBody("8", "A", "300"), false)
	if got := testutil.ToFloat64(stale) - base; got != 3 {
		t.Errorf("stale count %v, want 3", got)
	}
	if dl := deadLetters(t, e); len(dl) != 0 {
		t.Errorf("%d dead letters, want none", len(dl))
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}

	// After a restart the newest time is still known...
	e2 := openEngine(t, cfg, Options{OpenStore: boltStore(path, clock.Now), Now: clock.Now})
	deliver(e2, statusBody("9", "A", 250), false)
	// ...until the dedupe ttl has passed since it was delivered.
	clock.Advance(time.Hour + time.Minute)
	deliver(e2, statusBody("10", "A", 250), true)
}

// TestStaleMark reads keys and times as the contract says.
func TestStaleMark(t *testing.T) {
	ds := &DropStale{KeyPath: "k", TimePath: "t"}
	for _, c := range []struct {
		body string
		ok   bool
		at   int64
	}{
		{`{"k":"a","t":12}`, true, 12e9},
		{`{"k":"a","t":12.25}`, true, 12250e6},
		{`{"k":"a","t":"12"}`, true, 12e9},
		{`{"k":"a","t":"1970-01-01T00:00:12.5+00:00"}`, true, 12500e6},
		{`{"k":"a","t":"yesterday"}`, false, 0},
		{`{"k":"a"}`, false, 0},
		{`{"t":12}`, false, 0},
		{`{"k":null,"t":12}`, false, 0},
		{`{"k":"a","t":1e300}`, false, 0},
		{`{"k":7,"t":12}`, true, 12e9},
	} {
		m := staleMarkOf("x", ds, []byte(c.body))
		if m.ok != c.ok || m.at != c.at {
			t.Errorf("%s: ok=%v at=%d, want ok=%v at=%d", c.body, m.ok, m.at, c.ok, c.at)
		}
	}
	// A string key and a number key of the same digits are two keys.
	a := staleMarkOf("x", ds, []byte(`{"k":"7","t":1}`))
	b := staleMarkOf("x", ds, []byte(`{"k":7,"t":1}`))
	if a.key == b.key {
		t.Errorf("string and number keys collide: %q", a.key)
	}
}
