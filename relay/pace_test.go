package relay

import (
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// arrivals records when a target got each request.
type arrivals struct {
	mu    sync.Mutex
	times []time.Time
}

func (a *arrivals) add() {
	a.mu.Lock()
	a.times = append(a.times, time.Now())
	a.mu.Unlock()
}

func (a *arrivals) get() []time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]time.Time(nil), a.times...)
}

// checkSpacing fails unless the arrivals keep the rate: any k+1 of them
// span at least k intervals, less a slack for one request that set off
// late (a timer that fired late under load, a goroutine not yet
// scheduled) while the next one left on time. Two requests sent at once
// fail it; so does a rate exceeded by more than one request over a long
// window.
func checkSpacing(t *testing.T, times []time.Time, interval time.Duration) {
	t.Helper()
	checkSpacingSlack(t, times, interval, interval*3/4)
}

func checkSpacingSlack(t *testing.T, times []time.Time, interval, slack time.Duration) {
	t.Helper()
	for i := range times {
		for j := i + 1; j < len(times); j++ {
			if span, want := times[j].Sub(times[i]), time.Duration(j-i)*interval-slack; span < want {
				t.Errorf("requests %d to %d came within %s, want at least %s at %s apart", i, j, span, want+slack, interval)
				return
			}
		}
	}
}

// TestRateSpacesRequests: a rate spaces every request to its target,
// retries included, with a concurrency of 8; another target is not
// slowed, and a retry's attempt number counts attempts, not waits.
func TestRateSpacesRequests(t *testing.T) {
	var slow arrivals
	var mu sync.Mutex
	failed := map[string]bool{}
	limited := newTestTarget(t, func(w http.ResponseWriter, r *http.Request, _ int) {
		slow.add()
		// Every event's first attempt fails once: retries are paced too.
		id := r.Header.Get(HeaderIdempotencyKey)
		mu.Lock()
		defer mu.Unlock()
		if !failed[id] {
			failed[id] = true
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	free := newTestTarget(t, nil)
	tc := fastTarget("limited", limited.URL)
	tc.Concurrency = 8
	tc.Rate = Rate{N: 20, Per: time.Second}
	other := fastTarget("free", free.URL)
	e := openEngine(t, Config{Targets: []TargetConfig{tc, other}}, Options{OpenStore: memStore()})
	const events = 6
	for i := range events {
		mustAccept(t, e, v3Body(fmt.Sprint(i)))
	}
	waitFor(t, "the free target's deliveries", 5*time.Second, func() bool { return free.count() == events })
	if n := limited.count(); n >= 2*events {
		t.Errorf("the limited target had all %d requests by the time the free one had its %d", n, events)
	}
	waitFor(t, "the limited target's deliveries", 10*time.Second, func() bool { return targetStats(e, "limited").Pending == 0 })
	times := slow.get()
	if len(times) != 2*events {
		t.Fatalf("limited target got %d requests, want %d (each event twice)", len(times), 2*events)
	}
	checkSpacing(t, times, 50*time.Millisecond)
	for _, r := range limited.requests() {
		if a := r.Header.Get(HeaderAttempt); a != "1" && a != "2" {
			t.Errorf("attempt header %q, want 1 or 2: waiting for the rate is not an attempt", a)
		}
	}
}

// sharedMemory is a memory store that says it is shared, so that two
// engines on it coordinate as instances on NATS do.
type sharedMemory struct{ store.Store }

func (sharedMemory) Shared() bool { return true }

// TestRateRelayWide: two engines on one shared store keep one rate
// between them.
func TestRateRelayWide(t *testing.T) {
	var got arrivals
	target := newTestTarget(t, func(http.ResponseWriter, *http.Request, int) { got.add() })
	tc := fastTarget("t", target.URL)
	tc.Concurrency = 4
	tc.Rate = Rate{N: 25, Per: time.Second}
	shared := sharedMemory{store.NewMemory(store.MemoryOptions{})}
	open := func() (store.Store, error) { return shared, nil }
	cfg := Config{Targets: []TargetConfig{tc}}
	e1 := openEngine(t, cfg, Options{OpenStore: open})
	e2 := openEngine(t, cfg, Options{OpenStore: open})
	const events = 12
	for i := range events {
		mustAccept(t, []*Engine{e1, e2}[i%2], v3Body(fmt.Sprint(i)))
	}
	waitFor(t, "every delivery", 10*time.Second, func() bool { return target.count() == events })
	// Slots are relay-wide, the timers each engine's own: one interval of
	// slack (see checkSpacing) would still catch two engines each keeping
	// the rate alone.
	checkSpacingSlack(t, got.get(), 40*time.Millisecond, 40*time.Millisecond)
}

// TestRateChangeOnReload: a reload that lowers the rate applies to the
// next request; one that removes it lets requests go at once.
func TestRateChangeOnReload(t *testing.T) {
	var got arrivals
	target := newTestTarget(t, func(http.ResponseWriter, *http.Request, int) { got.add() })
	tc := fastTarget("t", target.URL)
	tc.Rate = Rate{N: 100, Per: time.Second}
	cfg := Config{Targets: []TargetConfig{tc}}
	e := openEngine(t, cfg, Options{OpenStore: memStore()})
	tc.Rate = Rate{N: 10, Per: time.Second}
	cfg.Targets = []TargetConfig{tc}
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		mustAccept(t, e, v3Body(fmt.Sprint(i)))
	}
	waitFor(t, "every delivery", 10*time.Second, func() bool { return target.count() == 4 })
	checkSpacing(t, got.get(), 100*time.Millisecond)
}
