//go:build unix

package faulttest

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// TestGracefulStop (issue 4, item 3): SIGTERM while deliveries are in
// flight at a target that holds each request for 2 s. After the stop,
// every acked event the target has not answered 200 must still be pending
// in the store (read directly: nothing marked delivered without a 2xx,
// nothing dead-lettered); after a restart with the target answering at
// once, every acked event arrives.
func TestGracefulStop(t *testing.T) {
	needCaddy(t)
	seed := testSeed(t)
	p := freePorts(t)
	slow := newTarget(t, "slow", modeHold)
	storeDir := t.TempDir()
	relay := fmt.Sprintf(`	webhook_relay stop {
		auth_header %s %s
		storage %s
		forward slow %s {
			timeout 10s
			concurrency 4
			backoff 50ms 500ms
			max_attempts 1000
		}
	}`, authHeader, secret, storeDir, slow.url)
	caddy := startCaddy(t, p, caddyfile(p, t.TempDir(), relay))
	l := newLedger()
	c := newClient(t, p, 2*time.Second)

	// The senders go on through the stop and the restart, retrying what
	// got no answer, so that every event stored is acked in the end.
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	waitSenders := loadGen{workers: 4, interval: 10 * time.Millisecond, resend: 0.1, prefix: "stop"}.start(ctx, c, l, seed)

	// Stop once a first round of held attempts has been answered and the
	// next is under way.
	deadline := time.Now().Add(10 * time.Second)
	for slow.tally().delivered < 4 || slow.inflight.Load() < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("no deliveries in flight after 10s: %+v, %d in flight", slow.tally(), slow.inflight.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	inflight := slow.inflight.Load()
	took, err := caddy.sigterm(30 * time.Second)
	ackedAtStop := l.ackedIDs()
	// With Caddy gone, no attempt may still be held open.
	for deadline := time.Now().Add(5 * time.Second); slow.inflight.Load() > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d attempts still held at the target 5s after caddy exited", slow.inflight.Load())
		}
	}
	atStop := slow.tally()
	t.Logf("SIGTERM with %d attempts in flight: caddy exited in %s (exit code %d), %d events acked",
		inflight, took.Round(time.Millisecond), exitCode(err), len(ackedAtStop))

	// What the stop left in the store.
	st, err := store.OpenBolt(filepath.Join(storeDir, "relay.db"), store.BoltOptions{Timeout: time.Second})
	if err != nil {
		t.Fatalf("opening the store after the stop: %v", err)
	}
	pending := map[string]bool{}
	err = st.Pending(func(d *store.Delivery) error {
		if d.Target == "slow" {
			pending[d.ID.String()] = true
		}
		return nil
	})
	stats, serr := st.Stats(time.Now())
	if cerr := st.Close(); cerr != nil {
		t.Fatal(cerr)
	}
	if err != nil || serr != nil {
		t.Fatalf("reading the store: %v, %v", err, serr)
	}
	if stats.Dead["slow"] != 0 {
		t.Errorf("%d dead letters after the stop", stats.Dead["slow"])
	}
	undelivered := slow.missing(ackedAtStop)
	var notPending int
	for _, id := range undelivered {
		if !pending[id] {
			notPending++
			if notPending <= 10 {
				t.Errorf("acked event %s was never answered 200, yet is not pending after the stop (okhi id %s): marked delivered without a 2xx?", id, l.okhiOf(id))
			}
		}
	}
	t.Logf("after the stop: %d acked events not yet delivered, %d of them pending in the store (%d pending in all); %d held attempts abandoned by the relay, %d answered 200",
		len(undelivered), len(undelivered)-notPending, len(pending), atStop.abandoned, atStop.delivered+atStop.redelivered)

	slow.set(modeOK)
	caddy.restart()
	time.Sleep(500 * time.Millisecond) // senders go on against the new start
	stop()
	waitSenders()
	caddy.waitDrained("stop", 30*time.Second)
	lost := checkAcked(t, slow, l)
	checkNotUnacked(t, slow, l)
	l.check(t)
	f, tl := l.figures(), slow.tally()
	t.Logf("caddy log: %s", caddy.logSummary())
	t.Logf("events acked %d (%d accepted, %d duplicate, %d without answer); target: %d delivered, %d re-deliveries; lost %d; no-answer errors %q",
		f.acked, f.accepted, f.duplicates, f.noAnswer, tl.delivered, tl.redelivered, lost, l.errSample())
}
