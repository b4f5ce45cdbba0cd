//go:build unix

package faulttest

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"
)

// TestOverload (issue 4, item 5): with max_pending 50 and the target down,
// the 51st new event gets 503 with Retry-After, while re-sends of acked
// events still get 200 duplicate; once the target is back and the backlog
// drains, 200 again. Every event answered 200 is delivered, and every
// event delivered was answered 200 at some point: those refused and never
// sent again are never delivered, nor even attempted.
func TestOverload(t *testing.T) {
	needCaddy(t)
	p := freePorts(t)
	legacy := newTarget(t, "legacy", modeDown)
	const maxPending = 50
	relay := fmt.Sprintf(`	webhook_relay overload {
		auth_header %s %s
		max_pending %d
		storage %s
		forward legacy %s {
			timeout 1s
			backoff 10ms 200ms
			max_attempts 100000
		}
	}`, authHeader, secret, maxPending, t.TempDir(), legacy.url)
	caddy := startCaddy(t, p, caddyfile(p, t.TempDir(), relay))
	l := newLedger()
	c := newClient(t, p, 2*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	once := func(_ int, a answer) bool { return a.err == nil && a.status == http.StatusServiceUnavailable }

	// Fill the queue, and go on past it.
	const sent = maxPending + 30
	var refused []event
	firstRefused := -1
	for i := range sent {
		ev := newEvent(fmt.Sprintf("overload-%02d", i), i%3 == 2, 0)
		a, ok := c.send(ctx, l, ev, once)
		switch {
		case ok:
			if firstRefused >= 0 {
				t.Errorf("event %d accepted after event %d was refused, with the target still down", i, firstRefused)
			}
		case a.status == http.StatusServiceUnavailable:
			if firstRefused < 0 {
				firstRefused = i
				t.Logf("first 503 at new event %d, Retry-After %q", i, a.retryAfter)
			}
			refused = append(refused, ev)
		default:
			t.Fatalf("event %d: %v", i, a)
		}
	}
	if f := l.figures(); f.accepted != maxPending || firstRefused != maxPending {
		t.Fatalf("with the target down and max_pending %d: %d accepted, first 503 at event %d", maxPending, f.accepted, firstRefused)
	}
	// Re-sends of acked events are still answered 200 while full.
	var resends int
	for _, ev := range l.ackedEvents()[:10] {
		if a, ok := c.send(ctx, l, ev, once); !ok || a.result != "duplicate" {
			t.Errorf("re-send of acked event %s while full: %v", ev.id, a)
		}
		resends++
	}

	// Half the refused events are sent again later, as OkHi would; the
	// other half never are (OkHi gave up on them).
	var again, abandoned []event
	for i, ev := range refused {
		if i%2 == 0 {
			again = append(again, ev)
		} else {
			abandoned = append(abandoned, ev)
		}
	}
	legacy.set(modeOK)
	up := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstOK time.Duration
	for i := range again {
		ev := again[i]
		wg.Add(1)
		go func() {
			defer wg.Done()
			if a, ok := c.send(ctx, l, ev, nil); ok {
				mu.Lock()
				if firstOK == 0 || a.at.Sub(up) < firstOK {
					firstOK = a.at.Sub(up)
				}
				mu.Unlock()
			} else {
				t.Errorf("refused event %s sent again after recovery: %v", ev.id, a)
			}
		}()
	}
	wg.Wait()
	// New events are accepted again.
	for i := range 10 {
		if a, ok := c.send(ctx, l, newEvent(fmt.Sprintf("overload-after-%02d", i), false, 0), nil); !ok {
			t.Fatalf("new event %d after recovery: %v", i, a)
		}
	}
	caddy.waitDrained("overload", 20*time.Second)
	lost := checkAcked(t, legacy, l)
	unacked := checkNotUnacked(t, legacy, l)
	l.check(t)
	gaveUp := map[string]bool{}
	for _, ev := range abandoned {
		gaveUp[ev.id] = true
	}
	for key, rc := range legacy.snapshot() {
		if gaveUp[rc.okhiID] {
			t.Errorf("event %s (%s) got only 503s and was never sent again, yet the target got %d requests for it", rc.okhiID, key, rc.requests)
		}
	}
	unavailable, err := caddy.metric("caddy_webhook_relay_received_total", `relay="overload"`, `result="unavailable"`)
	if err != nil {
		t.Fatal(err)
	}
	f, tl := l.figures(), legacy.tally()
	if int(unavailable) != f.unavailable {
		t.Errorf("received_total{result=unavailable} = %v, senders got %d 503s", unavailable, f.unavailable)
	}
	t.Logf("caddy log: %s", caddy.logSummary())
	t.Logf("max_pending %d: %d new events sent while the target was down, %d accepted, %d refused (%d sent again later, %d never), %d re-sends answered duplicate while full",
		maxPending, sent, maxPending, len(refused), len(again), len(abandoned), resends)
	t.Logf("after recovery: first 200 to a refused event %s after the target came back; events acked %d, 503s %d (metric %v); target: %d delivered, %d re-deliveries; lost %d, delivered without a 200 %d",
		firstOK.Round(time.Millisecond), f.acked, f.unavailable, unavailable, tl.delivered, tl.redelivered, lost, unacked)
}
