//go:build unix

package faulttest

import (
	"context"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestReloadUnderLoad (issue 4, item 2): while events stream in, the
// config is replaced every 300 ms, cycling through adding a target,
// changing a timeout and a concurrency, and removing a target; mostly
// through the admin /load endpoint, every fourth time with `caddy
// reload`. Nothing acked may be lost at the two targets configured
// throughout, the only 5xx allowed is 503 with Retry-After, Caddy's log
// shows no lock timeout and no duplicate metrics registration, and the
// relay's counters, kept across reloads, match what the senders saw.
func TestReloadUnderLoad(t *testing.T) {
	needCaddy(t)
	seed := testSeed(t)
	p := freePorts(t)
	crm := newTarget(t, "crm", modeOK)
	audit := newTarget(t, "audit", modeOK)
	extra := newTarget(t, "extra", modeOK)
	spare := newTarget(t, "spare", modeOK)
	store, home := t.TempDir(), t.TempDir()

	forward := func(tg *target, timeout string, concurrency int) string {
		return fmt.Sprintf(`
		forward %s %s {
			timeout %s
			concurrency %d
			backoff 20ms 200ms
			max_attempts 100000
		}`, tg.name, tg.url, timeout, concurrency)
	}
	config := func(forwards ...string) string {
		return caddyfile(p, home, fmt.Sprintf(`	webhook_relay reload {
		auth_header %s %s
		storage %s%s
	}`, authHeader, secret, store, strings.Join(forwards, "")))
	}
	// crm and audit are there throughout; extra and spare come and go.
	cycle := []string{
		config(forward(crm, "2s", 8), forward(audit, "2s", 4), forward(extra, "2s", 4)),                          // extra added
		config(forward(crm, "3s", 8), forward(audit, "2s", 4), forward(extra, "2s", 4), forward(spare, "1s", 2)), // spare added, a timeout changed
		config(forward(crm, "3s", 8), forward(audit, "1500ms", 2), forward(spare, "1s", 2)),                      // extra removed, a timeout and a concurrency changed
		config(forward(crm, "2s", 8), forward(audit, "2s", 4)),                                                   // spare removed, back to the start
	}
	caddy := startCaddy(t, p, cycle[3])
	l := newLedger()
	c := newClient(t, p, 2*time.Second)

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	waitFlap := audit.flap(ctx, seed, 0.3) // one of the lasting targets has outages too
	waitSenders := loadGen{workers: 4, interval: 15 * time.Millisecond, resend: 0.1, prefix: "reload"}.start(ctx, c, l, seed)

	const reloads = 20
	var viaCLI int
	var slowest time.Duration
	for i := range reloads {
		time.Sleep(300 * time.Millisecond) // the pace of the reloads, not a condition
		cfg := cycle[i%len(cycle)]
		start := time.Now()
		if i%4 == 3 {
			viaCLI++
			if err := caddy.reloadCLI(cfg); err != nil {
				t.Fatalf("reload %d: %v", i+1, err)
			}
		} else {
			status, body, err := caddy.load(cfg)
			if err != nil || status != http.StatusOK {
				t.Fatalf("reload %d: POST /load: %d %s %v", i+1, status, body, err)
			}
		}
		slowest = max(slowest, time.Since(start))
	}
	time.Sleep(300 * time.Millisecond)
	stop()
	waitSenders()
	waitFlap()

	rc := caddy.waitDrained("reload", 60*time.Second)
	lost := checkAcked(t, crm, l) + checkAcked(t, audit, l)
	checkNotUnacked(t, crm, l)
	checkNotUnacked(t, audit, l)
	l.check(t)
	for _, name := range []string{"crm", "audit"} {
		if rc.dead[name] != 0 {
			t.Errorf("%d dead letters at %s, configured throughout", rc.dead[name], name)
		}
	}

	f := l.figures()
	for status, n := range l.statuses {
		if status >= 500 && status != http.StatusServiceUnavailable {
			t.Errorf("%d answers with status %d", n, status)
		}
	}
	// Caddy's log: no bbolt lock timeout (the store opened twice), no
	// duplicate registration of the relay's collectors.
	logText := caddy.log()
	bad := regexp.MustCompile(`(?i)duplicate metrics collector registration|locked|timeout`)
	var badLines int
	for line := range strings.SplitSeq(logText, "\n") {
		if !bad.MatchString(line) || !(strings.Contains(line, `"level":"error"`) || strings.Contains(line, `"level":"warn"`) || strings.Contains(line, "duplicate metrics")) {
			continue
		}
		badLines++
		if badLines <= 5 {
			t.Errorf("caddy log: %s", line)
		}
	}
	// The counters outlived every reload: they count every request the
	// senders got an answer to, and no more than those sent.
	accepted, err := caddy.metric("caddy_webhook_relay_received_total", `relay="reload"`, `result="accepted"`)
	if err != nil {
		t.Fatal(err)
	}
	duplicate, err := caddy.metric("caddy_webhook_relay_received_total", `relay="reload"`, `result="duplicate"`)
	if err != nil {
		t.Fatal(err)
	}
	unavailable, err := caddy.metric("caddy_webhook_relay_received_total", `relay="reload"`, `result="unavailable"`)
	if err != nil {
		t.Fatal(err)
	}
	// A request without an answer may still have been counted: that is
	// the only slack.
	if int(accepted) < f.accepted || int(accepted) > f.accepted+f.noAnswer {
		t.Errorf("received_total{result=accepted} = %v, senders saw %d accepted (and %d requests without an answer)", accepted, f.accepted, f.noAnswer)
	}
	if int(accepted+duplicate) < f.accepted+f.duplicates || int(accepted+duplicate) > f.accepted+f.duplicates+f.noAnswer {
		t.Errorf("received_total accepted+duplicate = %v, senders saw %d 200s (and %d requests without an answer)", accepted+duplicate, f.accepted+f.duplicates, f.noAnswer)
	}
	if int(unavailable) < f.unavailable {
		t.Errorf("received_total{result=unavailable} = %v, senders saw %d 503s", unavailable, f.unavailable)
	}
	tc, ta := crm.tally(), audit.tally()
	// Every 200 the lasting targets gave was counted once, across reloads.
	for _, tg := range []struct {
		name string
		n    int
	}{{"crm", tc.delivered + tc.redelivered}, {"audit", ta.delivered + ta.redelivered}} {
		v, err := caddy.metric("caddy_webhook_relay_deliveries_total", `relay="reload"`, `target="`+tg.name+`"`, `result="delivered"`)
		if err != nil {
			t.Fatal(err)
		}
		if int(v) != tg.n {
			t.Errorf("deliveries_total{target=%s,result=delivered} = %v, the target answered %d requests 200", tg.name, v, tg.n)
		}
	}
	t.Logf("reloads %d (%d through /load, %d with caddy reload; slowest %s); events acked %d (answers: %d accepted, %d duplicate, %d 503, %d without answer); statuses %v",
		reloads, reloads-viaCLI, viaCLI, slowest.Round(time.Millisecond), f.acked, f.accepted, f.duplicates, f.unavailable, f.noAnswer, l.statuses)
	t.Logf("metrics: received_total accepted %v, duplicate %v, unavailable %v; requests without an answer: %q", accepted, duplicate, unavailable, l.errSample())
	t.Logf("caddy log: %s", caddy.logSummary())
	t.Logf("crm: %d delivered, %d re-deliveries; audit: %d delivered, %d re-deliveries; extra %d, spare %d delivered; dead letters %v; lost %d",
		tc.delivered, tc.redelivered, ta.delivered, ta.redelivered, extra.tally().delivered, spare.tally().delivered, rc.dead, lost)
}
