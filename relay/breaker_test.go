package relay

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// TestBreakerHoldsFailingTarget: a target that fails every attempt gets
// one probe at a time, each after a cooldown, instead of every pending
// delivery's own retries; the first success releases the backlog, which is
// then delivered in full.
func TestBreakerHoldsFailingTarget(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	var mu sync.Mutex
	var failedAt []time.Time
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		if down.Load() {
			mu.Lock()
			failedAt = append(failedAt, time.Now())
			mu.Unlock()
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	tc := fastTarget("t", target.URL)
	tc.BackoffMin, tc.BackoffMax = 20*time.Millisecond, 100*time.Millisecond
	tc.MaxAttempts = 1000
	tc.Concurrency = 8
	m := NewMetrics()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m.Collectors()...)
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: boltStore(tempBolt(t)), Metrics: m})
	const events = 100
	for i := range events {
		mustAccept(t, e, v3Body(fmt.Sprint(i)))
	}
	waitFor(t, "the breaker to trip", 10*time.Second, func() bool { return targetStats(e, "t").Held })
	tripped := target.count()
	if got := gather(t, reg, "caddy_webhook_relay_target_held"); got["t"] != 1 {
		t.Errorf("target_held = %v while held, want 1", got)
	}
	// In-flight attempts may still land; then probes, one at a time.
	waitFor(t, "five probes", 10*time.Second, func() bool { return target.count() >= tripped+tc.Concurrency+5 })
	mu.Lock()
	probes := failedAt[len(failedAt)-5:]
	mu.Unlock()
	for i := 1; i < len(probes); i++ {
		if gap := probes[i].Sub(probes[i-1]); gap < tc.BackoffMin {
			t.Errorf("probes %d and %d %s apart, want at least the cooldown %s", i-1, i, gap, tc.BackoffMin)
		}
	}
	if n := target.count(); n > 30+tc.Concurrency+len(probes) {
		t.Errorf("%d attempts against a down target with %d events pending: the breaker did not hold them", n, events)
	}

	down.Store(false)
	waitFor(t, "the backlog delivered", 10*time.Second, func() bool { return e.PendingEvents() == 0 })
	if st := targetStats(e, "t"); st.Held || st.DeadLetters != 0 || st.Pending != 0 {
		t.Errorf("after recovery: %+v", st)
	}
	if got := gather(t, reg, "caddy_webhook_relay_target_held"); got["t"] != 0 {
		t.Errorf("target_held = %v after recovery, want 0", got)
	}
	delivered := map[string]int{}
	for _, r := range target.requests()[target.count()-events:] {
		delivered[r.Header.Get(HeaderIdempotencyKey)]++
	}
	if len(delivered) != events {
		t.Errorf("the last %d requests carried %d distinct events, want each once", events, len(delivered))
	}
}

// TestBreakerQuietPeriod: failures in a row hold a target only when
// nothing succeeded for the quiet period, so a flaky target that still
// answers is not held; cooldowns follow the failures since the trip.
func TestBreakerQuietPeriod(t *testing.T) {
	q := newBreaker()
	const quiet = 100 * time.Millisecond
	var asked []int
	cooldown := func(n int) time.Duration { asked = append(asked, n); return time.Duration(n) * time.Second }
	at := func(ms int) int64 { return int64(ms) * int64(time.Millisecond) }
	q.answered(at(1000))
	for i := range 2 * tripAfter {
		if tripped, _ := q.failed(at(1001+i), quiet, cooldown); tripped {
			t.Fatalf("held after %d failures within %s of a success", i+1, quiet)
		}
	}
	if tripped, held := q.failed(at(1100), quiet, cooldown); !tripped || !held || !q.isHeld() {
		t.Fatal("not held after 21 failures and 100ms without a success")
	}
	if tripped, _ := q.failed(at(1200), quiet, cooldown); tripped {
		t.Error("a second trip reported")
	}
	if fmt.Sprint(asked) != "[1 2]" || q.holdUntil != at(1200)+int64(2*time.Second) {
		t.Errorf("cooldowns asked %v, held until %d", asked, q.holdUntil)
	}
	if !q.answered(at(1300)) || q.isHeld() {
		t.Fatal("an answer did not release the target")
	}
	for i := range tripAfter {
		if tripped, _ := q.failed(at(1301+i), quiet, cooldown); tripped {
			t.Fatalf("held %d failures after a release, within the quiet period", i+1)
		}
	}
}

// TestBreakerReleasedByNewSettings: a held target whose settings change (a
// reload with the right URL) gets its deliveries at once, not after the
// cooldown, which has grown by then.
func TestBreakerReleasedByNewSettings(t *testing.T) {
	wrong := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		w.WriteHeader(http.StatusBadGateway)
	})
	right := newTestTarget(t, nil)
	tc := fastTarget("t", wrong.URL)
	tc.BackoffMin, tc.BackoffMax = 50*time.Millisecond, time.Hour
	tc.Concurrency = 1
	cfg := Config{Targets: []TargetConfig{tc}}
	e := openEngine(t, cfg, Options{OpenStore: boltStore(tempBolt(t))})
	const events = 30
	for i := range events {
		mustAccept(t, e, v3Body(fmt.Sprint(i)))
	}
	// Ten failures trip the breaker; six probes later (50ms, 100ms, ...,
	// 1.6s apart) the next one is 3.2-6.4 s away.
	waitFor(t, "six probes", 20*time.Second, func() bool { return wrong.count() >= tripAfter+6 })
	if !targetStats(e, "t").Held {
		t.Fatal("not held after 16 failures")
	}
	cfg.Targets[0].URL = right.URL
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "every event at the new URL", 2*time.Second, func() bool { return e.PendingEvents() == 0 })
	if right.count() != events || targetStats(e, "t").Held {
		t.Errorf("new URL got %d requests for %d events; held %v", right.count(), events, targetStats(e, "t").Held)
	}
}

// TestBreakerExpiresHeldDeliveries: deliveries that pass max_age while
// their target is held become dead letters one after the other, not one
// per probe window (the attempt timeout).
func TestBreakerExpiresHeldDeliveries(t *testing.T) {
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	tc := fastTarget("t", target.URL)
	tc.BackoffMin, tc.BackoffMax = 20*time.Millisecond, 50*time.Millisecond
	tc.MaxAge = 300 * time.Millisecond
	tc.Timeout = 10 * time.Second // a probe holds the others for 11 s unless let go
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: boltStore(tempBolt(t))})
	const events = 30
	for i := range events {
		mustAccept(t, e, v3Body(fmt.Sprint(i)))
	}
	waitFor(t, "the breaker to trip", 5*time.Second, func() bool { return targetStats(e, "t").Held })
	waitFor(t, "every delivery dead-lettered for its age", 5*time.Second, func() bool {
		return targetStats(e, "t").DeadLetters == events
	})
	for _, dl := range deadLetters(t, e) {
		if !strings.Contains(dl.LastError, ReasonMaxAgeExceeded) {
			t.Errorf("dead letter %s: %q, want %q", dl.ID, dl.LastError, ReasonMaxAgeExceeded)
		}
	}
}

// TestBreakerSharedAcrossInstances: two engines on one store (as two
// instances on one NATS) hold a failing target together: both show it
// held, probes never overlap and keep the cooldown between them whichever
// engine sends them, and one success releases it on both.
func TestBreakerSharedAcrossInstances(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	var mu sync.Mutex
	var failedAt []time.Time
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		if down.Load() {
			mu.Lock()
			failedAt = append(failedAt, time.Now())
			mu.Unlock()
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	tc := fastTarget("t", target.URL)
	tc.BackoffMin, tc.BackoffMax = 50*time.Millisecond, 200*time.Millisecond
	tc.MaxAttempts = 1000
	tc.Concurrency = 4
	shared := store.NewMemory(store.MemoryOptions{})
	open := func() (store.Store, error) { return shared, nil }
	cfg := Config{Targets: []TargetConfig{tc}}
	e1 := openEngine(t, cfg, Options{OpenStore: open})
	e2 := openEngine(t, cfg, Options{OpenStore: open})
	const events = 60
	for i := range events {
		mustAccept(t, e1, v3Body(fmt.Sprint(i)))
	}
	waitFor(t, "both engines to hold the target", 10*time.Second, func() bool {
		return targetStats(e1, "t").Held && targetStats(e2, "t").Held
	})
	// Attempts under way at the trip may still land: at most one per
	// worker that took its delivery before its engine held the target,
	// within moments. Five more requests let them pass (four of them are
	// cooldowns apart at least); after them, only probes.
	before := target.count()
	waitFor(t, "five more requests", 10*time.Second, func() bool { return target.count() >= before+5 })
	waitFor(t, "attempts under way to end", 5*time.Second, func() bool { return target.inflight.Load() == 0 })
	target.maxIn.Store(0)
	before = target.count()
	waitFor(t, "six probes", 10*time.Second, func() bool { return target.count() >= before+6 })
	if n := target.maxIn.Load(); n > 1 {
		t.Errorf("%d probes out at once across the two engines, want one", n)
	}
	mu.Lock()
	probes := append([]time.Time(nil), failedAt[len(failedAt)-5:]...)
	mu.Unlock()
	for i := 1; i < len(probes); i++ {
		if gap := probes[i].Sub(probes[i-1]); gap < tc.BackoffMin {
			t.Errorf("probes %d and %d %s apart, want at least the cooldown %s", i-1, i, gap, tc.BackoffMin)
		}
	}

	down.Store(false)
	waitFor(t, "the backlog delivered and both released", 15*time.Second, func() bool {
		return e1.PendingEvents() == 0 && !targetStats(e1, "t").Held && !targetStats(e2, "t").Held
	})
}

// TestBreakerProbeWithoutDeliveryLetsGo: a probe that got no delivery
// (its worker was told to look at its settings again by a reload while it
// waited for one) takes its claim off the shared record, so that the next
// probe goes at once instead of waiting out the claim (the attempt's
// timeout and a second).
func TestBreakerProbeWithoutDeliveryLetsGo(t *testing.T) {
	tc := fastTarget("t", "http://127.0.0.1:1/")
	tc.Concurrency = 1
	cfg := Config{Targets: []TargetConfig{tc}}
	e := openEngine(t, cfg, Options{OpenStore: memStore()})
	e.mu.RLock()
	tg := e.targets["t"]
	e.mu.RUnlock()
	tg.brk.mu.Lock()
	tg.brk.held = true
	tg.brk.mu.Unlock()
	// The worker already waits in Take: make it pass the breaker again.
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	claim := func() int64 {
		rec, _, err := e.readBreaker(t.Context(), "t", e.now())
		if err != nil || !rec.Held {
			return 0
		}
		return rec.ProbeUntil
	}
	waitFor(t, "the probe's claim on the shared record", 5*time.Second, func() bool { return claim() > e.now().UnixNano() })
	first := claim()
	if err := e.Update(cfg); err != nil { // the worker waiting in Take looks again
		t.Fatal(err)
	}
	// The claim lasts tc.Timeout+1s = 6 s: a new one within 2 s means the
	// first was let go.
	waitFor(t, "the next probe's claim", 2*time.Second, func() bool { c := claim(); return c != 0 && c != first })
}

// TestBreakerHoldsWorkersWaitingInTheQueue: workers that passed the
// breaker before it held and wait in the queue for a delivery to fall due
// send none once it does: only the probe goes out, one at a time, a
// cooldown apart. Two events and four workers: two wait in the queue
// while the other two's attempts trip the breaker.
func TestBreakerHoldsWorkersWaitingInTheQueue(t *testing.T) {
	var mu sync.Mutex
	var at []time.Time
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		mu.Lock()
		at = append(at, time.Now())
		mu.Unlock()
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	tc := fastTarget("t", target.URL)
	tc.BackoffMin, tc.BackoffMax = 200*time.Millisecond, 200*time.Millisecond
	tc.MaxAttempts = 1000
	tc.Concurrency = 4
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("a"))
	mustAccept(t, e, v3Body("b"))
	waitFor(t, "the target held", 10*time.Second, func() bool { return targetStats(e, "t").Held })
	waitFor(t, "the tripping attempts to end", 5*time.Second, func() bool { return target.inflight.Load() == 0 })
	target.maxIn.Store(0)
	mu.Lock()
	first := len(at)
	mu.Unlock()
	waitFor(t, "three probes", 10*time.Second, func() bool { return target.count() >= first+3 })
	if n := target.maxIn.Load(); n > 1 {
		t.Errorf("%d requests out at once while held, want one probe", n)
	}
	mu.Lock()
	after := append([]time.Time(nil), at[first-1:]...)
	mu.Unlock()
	// From the last attempt before the hold, each request a cooldown on.
	for i := 1; i < len(after); i++ {
		if gap := after[i].Sub(after[i-1]); gap < tc.BackoffMin*9/10 {
			t.Errorf("requests %d and %d while held %s apart, want a cooldown (%s)", i-1, i, gap, tc.BackoffMin)
		}
	}
}
