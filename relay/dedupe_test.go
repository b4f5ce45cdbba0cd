package relay

import (
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

func TestDedupeLRU(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	evictions := 0
	d := newDedupe(2, func() { evictions++ })
	a, b, c := store.ID{1}, store.ID{2}, store.ID{3}

	if d.seen(a, now) {
		t.Fatal("empty LRU has seen a key")
	}
	d.add(a, now.Add(time.Hour), now)
	d.add(b, now.Add(time.Minute), now)
	if !d.seen(a, now.Add(59*time.Minute)) {
		t.Error("key forgotten before its expiry")
	}
	if d.seen(b, now.Add(time.Minute)) {
		t.Error("key seen at its expiry")
	}
	if d.len() != 1 {
		t.Errorf("len = %d after an expired key was looked up, want 1", d.len())
	}
	if evictions != 0 {
		t.Errorf("expired key counted as an eviction")
	}
	d.add(b, now.Add(time.Hour), now)
	d.add(c, now.Add(time.Hour), now) // pushes out a, the least recently used
	if evictions != 1 || d.seen(a, now) || !d.seen(b, now) || !d.seen(c, now) {
		t.Errorf("after overflow: evictions %d, a %v b %v c %v; want 1, false true true", evictions, d.seen(a, now), d.seen(b, now), d.seen(c, now))
	}
	// A key pushed out after its expiry is no loss: not counted.
	later := now.Add(2 * time.Hour)
	d.add(a, later.Add(time.Hour), later)
	if evictions != 1 {
		t.Errorf("evicting an expired key counted: %d evictions", evictions)
	}
	// Shrinking pushes out live keys: counted.
	d.add(b, later.Add(time.Hour), later)
	d.resize(1, later)
	if evictions != 2 || d.len() != 1 {
		t.Errorf("after resize: evictions %d, len %d; want 2, 1", evictions, d.len())
	}
}

// dedupeEngine is an engine with a memory store, a fake clock and one
// target that takes everything.
func dedupeEngine(t *testing.T, dd DedupeConfig) (*Engine, *fakeClock, *Metrics, *testTarget) {
	t.Helper()
	target := newTestTarget(t, nil)
	clock := newFakeClock()
	m := NewMetrics()
	e := openEngine(t, Config{
		Dedupe:  dd,
		Targets: []TargetConfig{fastTarget("legacy", target.URL)},
	}, Options{OpenStore: memStore(clock.Now), Now: clock.Now, Metrics: m})
	return e, clock, m, target
}

func TestDedupeWithinAndAfterTTL(t *testing.T) {
	e, clock, _, target := dedupeEngine(t, DedupeConfig{TTL: time.Hour})
	body := v3Body("evt-1")
	first := mustAccept(t, e, body)
	waitFor(t, "the event's delivery", 5*time.Second, func() bool { return e.PendingEvents() == 0 && target.count() == 1 })

	clock.Advance(59 * time.Minute)
	if got := mustDuplicate(t, e, body); got != first {
		t.Errorf("duplicate id %s, want %s", got, first)
	}
	clock.Advance(2 * time.Minute) // past the TTL
	n, err := e.ExpireKeys(t.Context())
	if err != nil || n != 1 {
		t.Fatalf("ExpireKeys = %d, %v; want 1", n, err)
	}
	if got := mustAccept(t, e, body); got != first {
		t.Errorf("the same event got another id after its key expired: %s, want %s", got, first)
	}
	waitFor(t, "the second delivery", 5*time.Second, func() bool { return target.count() == 2 })
	mustDuplicate(t, e, body)
}

// TestDedupeUndeliveredOutlivesTTL: an event still owed to a target is a
// duplicate whatever its key's age, since it is still stored.
func TestDedupeUndeliveredOutlivesTTL(t *testing.T) {
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	clock := newFakeClock()
	tc := fastTarget("down", target.URL)
	tc.BackoffMin, tc.BackoffMax = time.Hour, 2*time.Hour
	tc.MaxAge = 100 * time.Hour
	e := openEngine(t, Config{
		Dedupe:  DedupeConfig{TTL: time.Hour},
		Targets: []TargetConfig{tc},
	}, Options{OpenStore: memStore(clock.Now), Now: clock.Now})
	body := v3Body("evt-1")
	mustAccept(t, e, body)
	waitFor(t, "the first attempt", 5*time.Second, func() bool { return target.count() == 1 })
	clock.Advance(3 * time.Hour)
	if _, err := e.ExpireKeys(t.Context()); err != nil {
		t.Fatal(err)
	}
	mustDuplicate(t, e, body)
	if got := e.PendingEvents(); got != 1 {
		t.Errorf("PendingEvents = %d, want 1", got)
	}
}

func TestDedupeEvictionFallsBackToStore(t *testing.T) {
	e, _, m, target := dedupeEngine(t, DedupeConfig{Capacity: 2, TTL: time.Hour})
	evictions := m.DedupeEvictions.WithLabelValues(DefaultName)
	bodies := []string{v3Body("evt-1"), v3Body("evt-2"), v3Body("evt-3")}
	for _, b := range bodies {
		mustAccept(t, e, b)
	}
	if got := testutil.ToFloat64(evictions); got != 1 {
		t.Errorf("dedupe_evictions_total = %v, want 1", got)
	}
	if got := e.dd.len(); got != 2 {
		t.Errorf("LRU holds %d keys, want its capacity 2", got)
	}
	waitFor(t, "three deliveries", 5*time.Second, func() bool { return target.count() == 3 && e.PendingEvents() == 0 })
	// evt-1 left the LRU and its event left the store: only the store's
	// key still knows it.
	cfg := e.Config()
	if e.dd.seen(cfg.EventID([]byte(bodies[0])), time.Now()) {
		t.Fatal("evicted key still in the LRU")
	}
	mustDuplicate(t, e, bodies[0])
	// Found in the store, it is back in the LRU, pushing out another.
	if got := testutil.ToFloat64(evictions); got != 2 {
		t.Errorf("dedupe_evictions_total = %v, want 2", got)
	}
	if target.count() != 3 {
		t.Errorf("target got %d requests, want 3", target.count())
	}
}

func TestDedupeExpiredKeysAreNotEvictions(t *testing.T) {
	e, clock, m, _ := dedupeEngine(t, DedupeConfig{Capacity: 2, TTL: time.Minute})
	mustAccept(t, e, v3Body("evt-1"))
	mustAccept(t, e, v3Body("evt-2"))
	clock.Advance(2 * time.Minute)
	mustAccept(t, e, v3Body("evt-3"))
	mustAccept(t, e, v3Body("evt-4"))
	if got := testutil.ToFloat64(m.DedupeEvictions.WithLabelValues(DefaultName)); got != 0 {
		t.Errorf("dedupe_evictions_total = %v, want 0: the keys pushed out had expired", got)
	}
}

func TestDedupeOff(t *testing.T) {
	e, _, _, target := dedupeEngine(t, DedupeConfig{Off: true})
	body := v3Body("evt-1")
	a := mustAccept(t, e, body)
	b := mustAccept(t, e, body)
	if a == b {
		t.Errorf("dedupe off: both receipts got id %s", a)
	}
	waitFor(t, "both deliveries", 5*time.Second, func() bool { return target.count() == 2 })
	if e.dd.len() != 0 {
		t.Errorf("dedupe off: LRU holds %d keys", e.dd.len())
	}
}

func TestDedupeConcurrentReceipts(t *testing.T) {
	e, _, _, target := dedupeEngine(t, DedupeConfig{})
	const n = 32
	var wg sync.WaitGroup
	results := make(chan Result, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := e.Receive(t.Context(), []byte(v3Body("evt-1")), "application/json")
			if err != nil {
				t.Errorf("Receive: %v", err)
			}
			results <- res
		}()
	}
	wg.Wait()
	close(results)
	accepted := 0
	for r := range results {
		if !r.Duplicate {
			accepted++
		}
	}
	if accepted != 1 {
		t.Fatalf("%d of %d concurrent receipts of one event accepted, want 1", accepted, n)
	}
	waitFor(t, "the delivery", 5*time.Second, func() bool { return e.PendingEvents() == 0 && target.count() >= 1 })
	if got := target.count(); got != 1 {
		t.Errorf("target got %d requests, want 1", got)
	}
}

func BenchmarkDedupeSeen(b *testing.B) {
	const size = 100_000
	now := time.Now()
	d := newDedupe(size, nil)
	ids := make([]store.ID, size)
	for i := range ids {
		copy(ids[i][:], fmt.Sprintf("%016d", i))
		d.add(ids[i], now.Add(time.Hour), now)
	}
	b.Run("hit", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if !d.seen(ids[i%size], now) {
				b.Fatal("miss")
			}
			i++
		}
	})
	b.Run("miss", func(b *testing.B) {
		b.ReportAllocs()
		miss := store.ID{0xff}
		for b.Loop() {
			if d.seen(miss, now) {
				b.Fatal("hit")
			}
		}
	})
	b.Run("hit_parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				if !d.seen(ids[i%size], now) {
					b.Error("miss")
					return
				}
				i += 7
			}
		})
	})
}
