//go:build unix

package faulttest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// TestKill9UnderLoad (issue 4, item 1): Caddy is SIGKILLed at random
// moments while senders stream events at it and its target flaps between
// 503 and 200, and is started again on the same store each time. Once the
// target is up for good and the relay has drained, every event that ever
// got a 200 (accepted or duplicate) must have reached the target. Zero
// lost is the only pass.
func TestKill9UnderLoad(t *testing.T) {
	needCaddy(t)
	seed := testSeed(t)
	rng := rand.New(rand.NewPCG(seed, 0x4b111)) // not a sender's stream
	p := freePorts(t)
	crm := newTarget(t, "crm", modeOK)
	crm.delay.Store(int64(5 * time.Millisecond))
	relay := fmt.Sprintf(`	webhook_relay kill {
		auth_header %s %s
		storage %s
		forward crm %s {
			timeout 2s
			backoff 20ms 300ms
			max_attempts 100000
		}
	}`, authHeader, secret, t.TempDir(), crm.url)
	caddy := startCaddy(t, p, caddyfile(p, t.TempDir(), relay))
	l := newLedger()
	c := newClient(t, p, 2*time.Second)

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	waitFlap := crm.flap(ctx, seed, 0.4)
	waitSenders := loadGen{workers: 4, interval: 15 * time.Millisecond, resend: 0.1, prefix: "kill"}.start(ctx, c, l, seed)

	const kills = 10
	start := time.Now()
	for i := range kills {
		time.Sleep(time.Duration(50+rng.IntN(1450)) * time.Millisecond) // the random moment, right after a start included
		acked := l.figures().acked
		caddy.kill9()
		t.Logf("kill %d at %s: SIGKILL with %d events acked so far", i+1, time.Since(start).Round(time.Millisecond), acked)
		caddy.restart()
	}
	time.Sleep(time.Second) // senders go on against the last start
	stop()
	waitSenders()
	waitFlap() // and the target stays up

	rc := caddy.waitDrained("kill", 60*time.Second)
	lost := checkAcked(t, crm, l)
	checkNotUnacked(t, crm, l)
	l.check(t)
	if rc.dead["crm"] != 0 {
		t.Errorf("%d dead letters at crm: every event should have been delivered", rc.dead["crm"])
	}
	f, tl := l.figures(), crm.tally()
	t.Logf("slowest restart: ready %s after the start", caddy.slowestRestart.Round(time.Millisecond))
	t.Logf("kills %d; events acked %d (answers: %d accepted, %d duplicate, of which %d to exact re-sends; %d 503; %d without answer) in %d requests",
		kills, f.acked, f.accepted, f.duplicates, f.resent, f.unavailable, f.noAnswer, f.requests)
	t.Logf("caddy log: %s", caddy.logSummary())
	t.Logf("target: %d events delivered, %d requests, %d re-deliveries (200s beyond the first per event); lost %d",
		tl.delivered, tl.requests, tl.redelivered, lost)
	if f.acked < 300 {
		t.Errorf("only %d events acked: the load was too light to mean much", f.acked)
	}
}
