//go:build unix

package faulttest

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"
)

// TestLongOutage (issue 4, item 4): a target down for longer than several
// backoff steps (compressed to 10ms..200ms) gets everything once it is
// back, within a few backoff_max, and meanwhile is held to one probe at a
// time; and a dead target, hanging or answering 503, does not slow the
// deliveries to a healthy one.
func TestLongOutage(t *testing.T) {
	needCaddy(t)
	t.Run("recovery", testOutageRecovery)
	t.Run("isolation", testOutageIsolation)
}

func testOutageRecovery(t *testing.T) {
	p := freePorts(t)
	legacy := newTarget(t, "legacy", modeDown)
	relay := fmt.Sprintf(`	webhook_relay outage {
		auth_header %s %s
		storage %s
		forward legacy %s {
			timeout 1s
			backoff 10ms 200ms
			max_attempts 10000
		}
	}`, authHeader, secret, t.TempDir(), legacy.url)
	caddy := startCaddy(t, p, caddyfile(p, t.TempDir(), relay))
	l := newLedger()
	c := newClient(t, p, 2*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	const n = 20
	down := time.Now()
	for i := range n {
		if a, ok := c.send(ctx, l, newEvent(fmt.Sprintf("outage-%02d", i), i%2 == 1, 0), nil); !ok {
			t.Fatalf("event %d: %v", i, a)
		}
	}
	ids := l.ackedIDs()
	// Down for 3s, far past the doubling steps (10, 20, 40, 80, 160 ms),
	// and until the relay holds the target, every event tried at least
	// twice (ten failures in a row trip the breaker, then one probe at a
	// time goes out, at most backoff_max apart).
	const attempts, minOutage = 2, 3 * time.Second
	deadline := time.Now().Add(15 * time.Second)
	for {
		fewest, seen := attempts, legacy.snapshot()
		for _, id := range ids {
			fewest = min(fewest, seen[id].maxAttempt)
		}
		rc, err := caddy.counts("outage")
		if fewest >= attempts && err == nil && rc.held["legacy"] && time.Since(down) >= minOutage {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 15s of outage: fewest attempts of an event %d, held %v (%v)", fewest, rc.held["legacy"], err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := legacy.tally().delivered; got != 0 {
		t.Fatalf("%d events delivered by a target answering 503", got)
	}
	outage := time.Since(down)
	attemptsDown := legacy.tally().requests
	// Without the breaker each of the 20 events retries on its own
	// schedule: over 3s, at least 20 x 15 attempts at the 200ms cap.
	if limit := 10 + int(outage/(10*time.Millisecond)); attemptsDown > limit {
		t.Errorf("%d attempts in a %s outage, want at most %d: one probe at a time once held", attemptsDown, outage.Round(time.Millisecond), limit)
	}
	legacy.set(modeOK)
	up := time.Now()
	if m := legacy.waitDelivered(ids, 10*time.Second); len(m) > 0 {
		t.Fatalf("%d of %d events not delivered 10s after the target came back", len(m), n)
	}
	var last time.Time
	for _, id := range ids {
		if at, _ := legacy.deliveredAt(id); at.After(last) {
			last = at
		}
	}
	recovery := last.Sub(up)
	rc := caddy.waitDrained("outage", 10*time.Second)
	if rc.dead["legacy"] != 0 {
		t.Errorf("%d dead letters", rc.dead["legacy"])
	}
	checkAcked(t, legacy, l)
	l.check(t)
	// backoff_max is 200ms: after the outage every event is due again
	// within 200ms (plus jitter, and scheduling on a busy machine).
	// Without the cap, the 12th delay alone would be 10ms << 11 = 20s.
	if recovery > 2*time.Second {
		t.Errorf("the last event was delivered %s after the target came back; backoff_max is 200ms", recovery)
	}
	t.Logf("caddy log: %s", caddy.logSummary())
	t.Logf("outage %s, %d attempts during it (every event tried at least %d times, at most %d); all %d delivered %s after the target came back; %d re-deliveries",
		outage.Round(time.Millisecond), attemptsDown, attempts, legacy.tally().maxAttempt, n, recovery.Round(time.Millisecond), legacy.tally().redelivered)
}

func testOutageIsolation(t *testing.T) {
	p := freePorts(t)
	healthy := newTarget(t, "healthy", modeOK)
	dead := newTarget(t, "dead", modeHang)
	storeDir, home := t.TempDir(), t.TempDir()
	forward := func(tg *target) string {
		return fmt.Sprintf(`
		forward %s %s {
			timeout 2s
			concurrency 8
			backoff 10ms 200ms
			max_attempts 100000
		}`, tg.name, tg.url)
	}
	config := func(targets ...*target) string {
		var fw string
		for _, tg := range targets {
			fw += forward(tg)
		}
		return caddyfile(p, home, fmt.Sprintf(`	webhook_relay isolation {
		auth_header %s %s
		storage %s%s
	}`, authHeader, secret, storeDir, fw))
	}
	caddy := startCaddy(t, p, config(healthy))
	c := newClient(t, p, 2*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// phase sends events at a steady rate and returns, for each, the time
	// from its ack to its delivery at the healthy target.
	phase := func(name string) []time.Duration {
		t.Helper()
		const events = 100
		l := newLedger()
		for i := range events {
			if a, ok := c.send(ctx, l, newEvent(fmt.Sprintf("iso-%s-%03d", name, i), false, 0), nil); !ok {
				t.Fatalf("%s: event %d: %v", name, i, a)
			}
			time.Sleep(20 * time.Millisecond) // the rate, 50 events/s at most
		}
		ids := l.ackedIDs()
		if m := healthy.waitDelivered(ids, 10*time.Second); len(m) > 0 {
			t.Fatalf("%s: %d events not delivered to the healthy target", name, len(m))
		}
		l.check(t)
		lat := make([]time.Duration, 0, len(ids))
		for _, id := range ids {
			at, _ := healthy.deliveredAt(id)
			lat = append(lat, max(at.Sub(l.ackTime(id)), 0))
		}
		return lat
	}
	report := func(name string, lat []time.Duration) time.Duration {
		p99 := percentile(lat, 99)
		t.Logf("healthy target, %s: delivery latency p50 %s, p99 %s, max %s (%d events)",
			name, percentile(lat, 50).Round(time.Microsecond), p99.Round(time.Microsecond), percentile(lat, 100).Round(time.Microsecond), len(lat))
		return p99
	}

	report("alone", phase("alone"))

	if status, body, err := caddy.load(config(healthy, dead)); err != nil || status != http.StatusOK {
		t.Fatalf("adding the dead target: %d %s %v", status, body, err)
	}
	hang := phase("hang")
	hung := dead.inflight.Load()
	dead.set(modeDown)
	down := phase("down")
	td := dead.tally()
	t.Logf("dead target: %d requests (%d hung at once at the end of the hanging phase), none answered 200", td.requests, hung)
	const limit = time.Second
	if p99 := report("while the other target hangs", hang); p99 > limit {
		t.Errorf("p99 delivery latency to the healthy target %s while the other hangs, over %s", p99, limit)
	}
	if p99 := report("while the other target answers 503", down); p99 > limit {
		t.Errorf("p99 delivery latency to the healthy target %s while the other answers 503, over %s", p99, limit)
	}
	if td.delivered != 0 || td.requests == 0 {
		t.Errorf("dead target: %+v", td)
	}
}
