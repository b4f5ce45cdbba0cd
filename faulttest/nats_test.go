//go:build unix

package faulttest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"
)

// instanceHeader is the header each Caddy instance of a NATS test adds to
// its forwarded requests, naming itself: instances of one relay may differ
// in a forwarded header (the contract's "Several machines").
const instanceHeader = "X-Faulttest-Instance"

// TestNATSKillUnderLoad: two Caddy instances of one relay share a
// nats-server (a real process, JetStream, sync_interval always), with
// senders posting to both, half to each, and re-sending acked events to
// either. One instance at a time is SIGKILLed at random moments and
// started again; last, the target holds the deliveries of instance A and A
// is killed while holding them, and stays down until instance B has
// delivered them: the contract's takeover, within the attempt's timeout
// plus 10 s. Every event that got a 200 (accepted or duplicate) from
// either instance must reach the target; zero lost is the only pass.
func TestNATSKillUnderLoad(t *testing.T) {
	seed := testSeed(t)
	rng := rand.New(rand.NewPCG(seed, 0x4a75)) // not a sender's stream
	nats := startNATS(t)
	crm := newTarget(t, "crm", modeOK)
	crm.delay.Store(int64(5 * time.Millisecond))
	front := newFront(t, crm)
	const timeout = 2 * time.Second // the target's, in natsRelay
	pl := freePortList(t, 4)
	pa, pb := ports{relay: pl[0], admin: pl[1]}, ports{relay: pl[2], admin: pl[3]}
	config := func(p ports, instance string) string {
		return caddyfile(p, t.TempDir(), natsRelay("natskill", "FAULTTEST_NATSKILL", nats, crm.name, front.url,
			fmt.Sprintf("\n\t\t\theader %s %s", instanceHeader, instance)))
	}
	a := startCaddy(t, pa, config(pa, "a"))
	b := startCaddy(t, pb, config(pb, "b"))
	caddies := map[string]*caddyProc{"a": a, "b": b}
	for _, c := range []*caddyProc{a, b} {
		waitStoreUp(t, c, "natskill", 1, 20*time.Second)
	}
	l := newLedger()
	ca, cb := newClient(t, pa, 3*time.Second), newClient(t, pb, 3*time.Second)

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	flapCtx, stopFlap := context.WithCancel(ctx)
	defer stopFlap()
	waitFlap := crm.flap(flapCtx, seed, 0.3)
	waitA := loadGen{workers: 2, interval: 15 * time.Millisecond, resend: 0.1, prefix: "nka"}.start(ctx, ca, l, seed)
	waitB := loadGen{workers: 2, interval: 15 * time.Millisecond, resend: 0.1, prefix: "nkb"}.start(ctx, cb, l, seed+1)

	const kills = 6
	killed := map[string]int{}
	start := time.Now()
	for i := range kills {
		time.Sleep(time.Duration(50+rng.IntN(1450)) * time.Millisecond) // the random moment, right after a start included
		name := []string{"a", "b"}[rng.IntN(2)]
		acked := l.figures().acked
		caddies[name].kill9()
		killed[name]++
		t.Logf("kill %d at %s: SIGKILL of %s with %d events acked so far", i+1, time.Since(start).Round(time.Millisecond), name, acked)
		caddies[name].restart()
	}
	stopFlap()
	waitFlap() // the target up for good, so that a takeover is not put off by a 503

	// Takeover: hold A's attempts at the target, and kill A while it holds
	// them, within their timeout (else A gives up on them itself).
	front.holdFrom("a")
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, oldest := front.holding()
		if n >= 3 || (n > 0 && time.Since(oldest) > timeout/2) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance a held no delivery 10s after the target started holding its attempts (%d held)", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	heldKeys := front.heldNow()
	a.kill9()
	killAt := time.Now()
	killed["a"]++
	front.holdFrom("")
	t.Logf("kill %d at %s: SIGKILL of a while it held %d attempts at the target", kills+1, time.Since(start).Round(time.Millisecond), len(heldKeys))
	// A stays down: nothing may wait for the dead instance to come back.
	limit := timeout + 10*time.Second
	var takeover time.Duration
	for _, key := range heldKeys {
		at, by, ok := front.waitDeliveredAfter(key, killAt, limit+5*time.Second)
		switch {
		case !ok:
			t.Errorf("delivery %s held by a at its kill: not delivered %s after it", key, limit+5*time.Second)
		case by != "b":
			t.Errorf("delivery %s held by a at its kill: first delivered after it by %q, want b", key, by)
		}
		if ok {
			takeover = max(takeover, at.Sub(killAt))
		}
	}
	if takeover > limit {
		t.Errorf("takeover took %s (kill of a to b's delivery of what a held), over the attempt's timeout plus 10s (%s)", takeover.Round(time.Millisecond), limit)
	}
	a.restart()
	time.Sleep(time.Second) // senders go on against both, the last start included
	stop()
	waitA()
	waitB()

	rc := a.waitDrained("natskill", 60*time.Second)
	rcb := b.waitDrained("natskill", 10*time.Second)
	lost := checkAcked(t, crm, l)
	checkNotUnacked(t, crm, l)
	l.check(t)
	if rc.dead["crm"] != 0 || rcb.dead["crm"] != 0 {
		t.Errorf("dead letters at crm (a says %d, b %d): every event should have been delivered", rc.dead["crm"], rcb.dead["crm"])
	}
	f, tl := l.figures(), crm.tally()
	twice := 0
	for _, r := range crm.snapshot() {
		if r.delivered > 1 {
			twice++
		}
	}
	byA, byB := front.deliveredBy("a"), front.deliveredBy("b")
	t.Logf("slowest restart: ready %s after the start (a %s, b %s)",
		max(a.slowestRestart, b.slowestRestart).Round(time.Millisecond), a.slowestRestart.Round(time.Millisecond), b.slowestRestart.Round(time.Millisecond))
	t.Logf("takeover: %d attempts held by a at its kill, all delivered by b within %s of the kill (limit %s)",
		len(heldKeys), takeover.Round(time.Millisecond), limit)
	t.Logf("kills %d (a %d, b %d); events acked %d (answers: %d accepted, %d duplicate, of which %d to exact re-sends; %d 503; %d without answer) in %d requests",
		kills+1, killed["a"], killed["b"], f.acked, f.accepted, f.duplicates, f.resent, f.unavailable, f.noAnswer, f.requests)
	t.Logf("caddy log: a: %s; b: %s", a.logSummary(), b.logSummary())
	t.Logf("target: %d events delivered (200s: %d from a, %d from b), %d requests, %d delivered twice or more, %d re-deliveries (200s beyond the first per event); lost %d",
		tl.delivered, byA, byB, tl.requests, twice, tl.redelivered, lost)
	if f.acked < 200 {
		t.Errorf("only %d events acked: the load was too light to mean much", f.acked)
	}
	if byA == 0 || byB == 0 {
		t.Errorf("deliveries by a %d, by b %d: both instances should deliver", byA, byB)
	}
}

// TestNATSRestartWhileFlowing: senders post to one Caddy while its
// nats-server is stopped (SIGTERM, then started on the same store) and
// later SIGKILLed and started again. While NATS is down every answer to a
// request sent after it went is 503 with Retry-After within a few seconds
// (a duplicate for an event already stored is allowed; accepted never),
// store_up goes 0; once NATS is back, store_up goes 1 and intake answers
// 200 within 10 s of the restart; and nothing acked is lost.
func TestNATSRestartWhileFlowing(t *testing.T) {
	seed := testSeed(t)
	nats := startNATS(t)
	crm := newTarget(t, "crm", modeOK)
	crm.delay.Store(int64(2 * time.Millisecond))
	p := freePorts(t)
	caddy := startCaddy(t, p, caddyfile(p, t.TempDir(), natsRelay("natsflow", "FAULTTEST_NATSFLOW", nats, crm.name, crm.url, "")))
	waitStoreUp(t, caddy, "natsflow", 1, 20*time.Second)
	l := newLedger()
	// Longer than the store's timeout (2s): an answer that does not come
	// within it is a failure of the contract, not of the client.
	c := newClient(t, p, 6*time.Second)
	var tl timeline

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	wait := flow{workers: 4, interval: 10 * time.Millisecond, resend: 0.1, prefix: "nf"}.start(ctx, c, l, &tl, seed)

	type outage struct {
		how                       string
		down, up                  time.Time // NATS gone; NATS started again
		storeDown, healthy, first time.Duration
		storeUp                   time.Duration
		answersDown, dupsDown     int
		slowestDown               time.Duration
	}
	var outages []outage
	flowUntil := func(d time.Duration, events int) {
		t.Helper()
		from := l.figures().acked
		deadline := time.Now().Add(10 * time.Second)
		for begin := time.Now(); time.Since(begin) < d || l.figures().acked-from < events; {
			if time.Now().After(deadline) {
				t.Fatalf("only %d events acked in 10s with NATS up", l.figures().acked-from)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	for _, how := range []string{"SIGTERM", "SIGKILL"} {
		flowUntil(1500*time.Millisecond, 50)
		var o outage
		o.how = how
		if how == "SIGTERM" {
			nats.stop()
		} else {
			nats.kill9()
		}
		o.down = time.Now()
		o.storeDown = waitStoreUp(t, caddy, "natsflow", 0, 10*time.Second)
		// Down long enough for many answers after it went, each of them
		// checked below.
		for deadline := time.Now().Add(15 * time.Second); tl.answeredBetween(o.down, time.Now()) < 40 || time.Since(o.down) < 2*time.Second; {
			if time.Now().After(deadline) {
				t.Fatalf("NATS down (%s): only %d answers in 15s", how, tl.answeredBetween(o.down, time.Now()))
			}
			time.Sleep(20 * time.Millisecond)
		}
		o.up = time.Now()
		nats.restart()
		o.healthy = time.Since(o.up)
		o.storeUp = waitStoreUp(t, caddy, "natsflow", 1, 15*time.Second) + o.healthy
		first, ok := tl.first200After(o.up, 15*time.Second)
		if !ok {
			t.Fatalf("NATS back (%s): no 200 within 15s of its restart", how)
		}
		o.first = first.Sub(o.up)
		if o.first > 10*time.Second {
			t.Errorf("NATS back (%s): first 200 %s after the restart, want within 10s", how, o.first.Round(time.Millisecond))
		}
		o.answersDown, o.dupsDown, o.slowestDown = tl.checkDown(t, how, o.down, o.up)
		outages = append(outages, o)
	}
	flowUntil(time.Second, 50)
	stop()
	wait()

	rc := caddy.waitDrained("natsflow", 30*time.Second)
	lost := checkAcked(t, crm, l)
	checkNotUnacked(t, crm, l)
	l.check(t)
	if rc.dead["crm"] != 0 {
		t.Errorf("%d dead letters at crm: every event should have been delivered", rc.dead["crm"])
	}
	for _, o := range outages {
		t.Logf("NATS %s: down %s; store_up 0 after %s; %d answers to requests sent while down (%d duplicate, the rest 503 + Retry-After), slowest %s; restarted: healthy after %s, store_up 1 after %s, first 200 %s after the restart",
			o.how, o.up.Sub(o.down).Round(time.Millisecond), o.storeDown.Round(time.Millisecond), o.answersDown, o.dupsDown, o.slowestDown.Round(time.Millisecond),
			o.healthy.Round(time.Millisecond), o.storeUp.Round(time.Millisecond), o.first.Round(time.Millisecond))
	}
	f, tt := l.figures(), crm.tally()
	t.Logf("events acked %d (answers: %d accepted, %d duplicate, of which %d to exact re-sends; %d 503; %d without answer) in %d requests",
		f.acked, f.accepted, f.duplicates, f.resent, f.unavailable, f.noAnswer, f.requests)
	t.Logf("caddy log: %s", caddy.logSummary())
	t.Logf("target: %d events delivered, %d requests, %d re-deliveries (200s beyond the first per event); lost %d",
		tt.delivered, tt.requests, tt.redelivered, lost)
}

// waitStoreUp polls the admin /metrics until relay's store_up is want, and
// returns how long that took.
func waitStoreUp(t *testing.T, c *caddyProc, relay string, want float64, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	var got float64
	var err error
	for {
		got, err = c.metric("caddy_webhook_relay_store_up", `relay="`+relay+`"`)
		if err == nil && got == want {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("store_up of relay %s is %v (%v) after %s, want %v; caddy log:\n%s", relay, got, err, timeout, want, c.logTail(20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// front stands before a target and knows which instance sent each
// request (instanceHeader). While told to, it holds one instance's
// requests, never answering them, until that instance leaves.
type front struct {
	tg   *target
	url  string
	quit chan struct{}

	mu        sync.Mutex
	from      string               // whose requests to hold; "" none
	held      map[string]time.Time // key -> since when, while held
	delivered map[string][]answered
	by        map[string]int // 200s per instance
}

// answered is one 200 of the target, and who it went to.
type answered struct {
	instance string
	at       time.Time
}

func newFront(t *testing.T, tg *target) *front {
	t.Helper()
	f := &front{tg: tg, quit: make(chan struct{}), held: map[string]time.Time{}, delivered: map[string][]answered{}, by: map[string]int{}}
	srv := httptest.NewServer(http.HandlerFunc(f.serve))
	f.url = srv.URL + "/hook/" + tg.name
	t.Cleanup(func() {
		close(f.quit) // free held handlers, or Close waits for them
		srv.Close()
	})
	return f
}

func (f *front) serve(w http.ResponseWriter, r *http.Request) {
	inst, key := r.Header.Get(instanceHeader), r.Header.Get("Idempotency-Key")
	f.mu.Lock()
	hold := inst != "" && inst == f.from
	if hold {
		f.held[key] = time.Now()
	}
	f.mu.Unlock()
	if hold {
		select {
		case <-r.Context().Done():
		case <-f.quit:
		}
		f.mu.Lock()
		delete(f.held, key)
		f.mu.Unlock()
		return
	}
	sw := &statusWriter{ResponseWriter: w}
	f.tg.serve(sw, r)
	if sw.status == http.StatusOK {
		f.mu.Lock()
		f.delivered[key] = append(f.delivered[key], answered{instance: inst, at: time.Now()})
		f.by[inst]++
		f.mu.Unlock()
	}
}

// holdFrom starts holding the requests of instance, or with "" stops.
func (f *front) holdFrom(instance string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.from = instance
}

// holding returns how many requests are held and since when the oldest.
func (f *front) holding() (int, time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var oldest time.Time
	for _, at := range f.held {
		if oldest.IsZero() || at.Before(oldest) {
			oldest = at
		}
	}
	return len(f.held), oldest
}

func (f *front) heldNow() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	keys := make([]string, 0, len(f.held))
	for k := range f.held {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func (f *front) deliveredBy(instance string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.by[instance]
}

// waitDeliveredAfter polls until key has been answered 200 after since,
// and returns when and to whom first.
func (f *front) waitDeliveredAfter(key string, since time.Time, timeout time.Duration) (time.Time, string, bool) {
	deadline := time.Now().Add(timeout)
	for {
		f.mu.Lock()
		for _, d := range f.delivered[key] {
			if d.at.After(since) {
				f.mu.Unlock()
				return d.at, d.instance, true
			}
		}
		f.mu.Unlock()
		if time.Now().After(deadline) {
			return time.Time{}, "", false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// statusWriter keeps the status a handler wrote.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// timeline is every request of a flow with when it was sent and its
// answer, to judge the answers by what NATS was doing meanwhile.
type timeline struct {
	mu    sync.Mutex
	posts []timedPost
}

type timedPost struct {
	sent time.Time
	ev   event
	a    answer
}

func (tl *timeline) add(p timedPost) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	tl.posts = append(tl.posts, p)
}

func (tl *timeline) snapshot() []timedPost {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	return append([]timedPost(nil), tl.posts...)
}

// answeredBetween counts the requests sent after from and answered
// before to.
func (tl *timeline) answeredBetween(from, to time.Time) int {
	n := 0
	for _, p := range tl.snapshot() {
		if p.sent.After(from) && p.a.at.Before(to) {
			n++
		}
	}
	return n
}

// first200After polls until some request is answered 200 after since.
func (tl *timeline) first200After(since time.Time, timeout time.Duration) (time.Time, bool) {
	deadline := time.Now().Add(timeout)
	for {
		var first time.Time
		for _, p := range tl.snapshot() {
			if p.a.err == nil && p.a.status == http.StatusOK && p.a.at.After(since) && (first.IsZero() || p.a.at.Before(first)) {
				first = p.a.at
			}
		}
		if !first.IsZero() {
			return first, true
		}
		if time.Now().After(deadline) {
			return time.Time{}, false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkDown fails the test for every request sent once NATS was gone and
// answered before it was started again that did not get 503 with a
// Retry-After, or a duplicate, within a few seconds; it returns how many
// there were, how many of them were duplicates, and the slowest answer.
func (tl *timeline) checkDown(t *testing.T, how string, down, up time.Time) (n, dups int, slowest time.Duration) {
	t.Helper()
	const budget = 4 * time.Second // the store's timeout (2s), and room for a busy machine
	bad := 0
	for _, p := range tl.snapshot() {
		if !p.sent.After(down) || !p.a.at.Before(up) {
			continue
		}
		n++
		took := p.a.at.Sub(p.sent)
		slowest = max(slowest, took)
		var problem string
		switch {
		case p.a.err != nil:
			problem = "no answer: " + p.a.err.Error()
		case p.a.status == http.StatusServiceUnavailable:
			if s, err := strconv.Atoi(p.a.retryAfter); err != nil || s < 1 {
				problem = fmt.Sprintf("503 with Retry-After %q", p.a.retryAfter)
			}
		case p.a.status == http.StatusOK && p.a.result == "duplicate":
			dups++
		default:
			problem = "answered " + p.a.String()
		}
		if problem == "" && took > budget {
			problem = fmt.Sprintf("answered %s after %s", p.a, took.Round(time.Millisecond))
		}
		if problem != "" {
			bad++
			if bad <= 10 {
				t.Errorf("NATS down (%s): event %s (re-send %v) sent %s after NATS went: %s",
					how, p.ev.id, p.ev.resend, p.sent.Sub(down).Round(time.Millisecond), problem)
			}
		}
	}
	if n == 0 {
		t.Errorf("NATS down (%s): no request sent and answered while it was down", how)
	}
	return n, dups, slowest
}

// flow is loadGen's senders, every request also kept in a timeline.
type flow loadGen

// start runs the senders until ctx ends; wait waits for them. As with
// loadGen, an event still unanswered when ctx ends is retried for up to
// 20 s more, so that what was stored is acked.
func (g flow) start(ctx context.Context, c *client, l *ledger, tl *timeline, seed uint64) (wait func()) {
	return loadGen(g).run(ctx, l, seed, func(ctx context.Context, ev event) { g.send(ctx, c, l, tl, ev) })
}

// send posts ev until it is answered 200, as client.send does.
func (g flow) send(ctx context.Context, c *client, l *ledger, tl *timeline, ev event) bool {
	pause := 25 * time.Millisecond
	for {
		sent := time.Now()
		a := c.post(ev.body)
		l.record(ev, a)
		tl.add(timedPost{sent: sent, ev: ev, a: a})
		switch {
		case a.err == nil && a.status == http.StatusOK:
			return true
		case a.err == nil && a.status != http.StatusServiceUnavailable:
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(pause):
		}
		pause = min(2*pause, 250*time.Millisecond)
	}
}

// TestNATSBodyOverMaxPayload: NATS's default max_payload and the relay's
// default max_body are both 1 MiB, but the payload holds the message's
// headers too: a body just under max_body can never be stored. It gets
// 413, not a 503 the sender would retry for ever, and nothing reaches the
// target; a normal event still goes through.
func TestNATSBodyOverMaxPayload(t *testing.T) {
	nats := startNATS(t)
	crm := newTarget(t, "crm", modeOK)
	p := freePorts(t)
	caddy := startCaddy(t, p, caddyfile(p, t.TempDir(), natsRelay("natsbig", "FAULTTEST_NATSBIG", nats, crm.name, crm.url, "")))
	waitStoreUp(t, caddy, "natsbig", 1, 20*time.Second)
	c := newClient(t, p, 6*time.Second)
	const size = 1<<20 - 40 // within max_body; over max_payload with the headers
	big := newEvent("big-1", false, 1)
	big = newEvent("big-1", false, 1+size-len(big.body))
	if len(big.body) != size {
		t.Fatalf("test body is %d bytes, want %d", len(big.body), size)
	}
	if a := c.post(big.body); a.status != http.StatusRequestEntityTooLarge {
		t.Fatalf("event over max_payload: %s, want 413", a)
	}
	small := newEvent("small-1", false, 0)
	a := c.post(small.body)
	if a.status != http.StatusOK || a.result != "accepted" {
		t.Fatalf("normal event after it: %s, want 200 accepted", a)
	}
	if missing := crm.waitDelivered([]string{a.eventID}, 10*time.Second); len(missing) > 0 {
		t.Fatalf("normal event not delivered: %v", missing)
	}
	if n := crm.tally().keys; n != 1 {
		t.Errorf("target saw %d events, want only the normal one", n)
	}
}
