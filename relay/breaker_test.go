package relay

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
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
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: boltStore(tempBolt(t))})
	const events = 100
	for i := range events {
		mustAccept(t, e, v3Body(fmt.Sprint(i)))
	}
	waitFor(t, "the breaker to trip", 10*time.Second, func() bool { return targetStats(e, "t").Held })
	tripped := target.count()
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
	delivered := map[string]int{}
	for _, r := range target.requests()[target.count()-events:] {
		delivered[r.Header.Get(HeaderIdempotencyKey)]++
	}
	if len(delivered) != events {
		t.Errorf("the last %d requests carried %d distinct events, want each once", events, len(delivered))
	}
}
