package relay

import (
	"context"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// last returns the final n values of series.
func last(series []int64, n int) []int64 { return series[len(series)-n:] }

func TestRingCountsPerStep(t *testing.T) {
	t0 := time.Unix(0, 1000*int64(HistoryStep)) // the start of a step
	var r ring
	r.add(t0, 1)
	r.add(t0.Add(HistoryStep-1), 2)
	r.add(t0.Add(2*HistoryStep), 5)
	got, any := r.read(stepOf(t0.Add(3 * HistoryStep)))
	if !any || len(got) != HistorySteps {
		t.Fatalf("read: %d values, any %v", len(got), any)
	}
	if want := []int64{0, 3, 0, 5, 0}; !slices.Equal(last(got, 5), want) {
		t.Errorf("last steps %v, want %v", last(got, 5), want)
	}

	// A step the window has moved past is cleared before it is reused.
	r.add(t0.Add(HistorySteps*HistoryStep), 7)
	got, _ = r.read(stepOf(t0.Add(HistorySteps * HistoryStep)))
	if want := []int64{5, 0}; !slices.Equal(got[1:3], want) || got[HistorySteps-1] != 7 {
		t.Errorf("after a window: oldest %v, newest %d; want %v and 7", got[:3], got[HistorySteps-1], want)
	}
	for _, v := range got[3 : HistorySteps-1] {
		if v != 0 {
			t.Fatalf("a cleared step holds %d: %v", v, got)
		}
	}

	// Silence longer than the window empties it; a time before the
	// window is dropped rather than counted in a reused slot.
	later := t0.Add(3 * HistorySteps * HistoryStep)
	r.add(later, 1)
	r.add(t0, 100)
	got, _ = r.read(stepOf(later))
	var sum int64
	for _, v := range got {
		sum += v
	}
	if sum != 1 || got[HistorySteps-1] != 1 {
		t.Errorf("after a long silence the window sums to %d (newest %d), want 1", sum, got[HistorySteps-1])
	}
	// A read ahead of the newest write shows the steps since as empty.
	got, _ = r.read(stepOf(later) + 2)
	if want := []int64{1, 0, 0}; !slices.Equal(last(got, 3), want) {
		t.Errorf("read ahead: %v, want %v", last(got, 3), want)
	}
}

func TestGaugeRingTellsZeroFromNoSample(t *testing.T) {
	t0 := time.Unix(0, 1000*int64(HistoryStep))
	r := ring{gauge: true}
	if _, any := r.read(stepOf(t0)); any {
		t.Fatal("an empty gauge reads as holding something")
	}
	r.set(t0, 4)
	r.set(t0.Add(time.Second), 2) // the step's last sample wins
	r.set(t0.Add(2*HistoryStep), 0)
	got, any := r.read(stepOf(t0.Add(2 * HistoryStep)))
	if want := []int64{-1, 2, -1, 0}; !any || !slices.Equal(last(got, 4), want) {
		t.Errorf("gauge %v (any %v), want %v", last(got, 4), any, want)
	}
}

func TestHistoryRate(t *testing.T) {
	end := time.Unix(1000, 0)
	h := History{Step: 10 * time.Second, End: end, Now: end.Add(-5 * time.Second)}
	series := []int64{100, 10, 20, 30, 5} // the last step is half gone
	if got, want := h.Rate(series, 30*time.Second), (20.0+30+5)/25; got != want {
		t.Errorf("rate over 30s %v, want %v (two whole steps and a half)", got, want)
	}
	if got, want := h.Rate(series, time.Hour), 165.0/45; got != want {
		t.Errorf("rate over more steps than held %v, want %v", got, want)
	}
	if got := h.Rate([]int64{-1, -1, 0}, 30*time.Second); got != 0 {
		t.Errorf("rate over gaps %v, want 0", got)
	}
	h.Now = end.Add(-h.Step) // read at the very start of a step
	if got := h.Rate([]int64{0, 0, 0}, 10*time.Second); got != 0 {
		t.Errorf("rate over an empty step just begun %v, want 0", got)
	}
}

// TestEngineHistory: answers counted by result, outcomes by target and
// result, pending sampled once a step; a removed target's series stay
// while they hold something and go once they are out of the window.
func TestEngineHistory(t *testing.T) {
	clock := newFakeClock()
	ok := newTestTarget(t, nil)
	bad := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(http.StatusBadRequest) })
	down := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(http.StatusServiceUnavailable) })
	slow := fastTarget("down", down.URL)
	slow.BackoffMin, slow.BackoffMax = time.Hour, time.Hour
	cfg := Config{Targets: []TargetConfig{fastTarget("ok", ok.URL), fastTarget("bad", bad.URL), slow}}
	e := openEngine(t, cfg, Options{OpenStore: memStore(clock.Now), Now: clock.Now})

	for _, id := range []string{"h1", "h2", "h3"} {
		mustAccept(t, e, v3Body(id))
		e.Observe(ResultAccepted, time.Millisecond)
	}
	mustDuplicate(t, e, v3Body("h1"))
	e.Observe(ResultDuplicate, time.Millisecond)
	e.Observe(ResultUnauthorized, 0)
	waitFor(t, "3 deliveries at ok, 3 dead letters at bad, 3 retries at down", 5*time.Second, func() bool {
		d := e.History().Deliveries
		now := func(target, result string) int64 { return last(d[target][result], 1)[0] }
		return now("ok", "delivered") == 3 && now("bad", "dead_lettered") == 3 && now("down", "retried") == 3
	})
	e.recordPending(t.Context())
	h := e.History()
	if h.Step != HistoryStep || !h.End.After(clock.Now()) || h.End.Sub(clock.Now()) > HistoryStep {
		t.Errorf("step %s ending %s at %s", h.Step, h.End, clock.Now())
	}
	for result, want := range map[string]int64{ResultAccepted: 3, ResultDuplicate: 1, ResultUnauthorized: 1, ResultInvalid: 0} {
		if got := last(h.Intake[result], 1)[0]; got != want {
			t.Errorf("intake %s: %d in the current step, want %d", result, got, want)
		}
	}
	for target, want := range map[string]int64{"ok": 0, "bad": 0, "down": 3} {
		if got := last(h.Pending[target], 1)[0]; got != want {
			t.Errorf("pending at %s: %d, want %d", target, got, want)
		}
	}

	// A step later the counts start again; pending is sampled anew.
	clock.Advance(HistoryStep)
	mustAccept(t, e, v3Body("h4"))
	e.Observe(ResultAccepted, time.Millisecond)
	waitFor(t, "h4 delivered at ok", 5*time.Second, func() bool {
		return last(e.History().Deliveries["ok"]["delivered"], 1)[0] == 1
	})
	e.recordPending(t.Context())
	h = e.History()
	if got := last(h.Intake[ResultAccepted], 2); !slices.Equal(got, []int64{3, 1}) {
		t.Errorf("accepted in the last two steps %v, want [3 1]", got)
	}
	if got := last(h.Pending["down"], 2); !slices.Equal(got, []int64{3, 4}) {
		t.Errorf("pending at down in the last two steps %v, want [3 4]", got)
	}
	// The fake clock stands at the same point of each step.
	elapsed := HistoryStep - h.End.Sub(h.Now)
	if got, want := h.Rate(h.Deliveries["ok"]["delivered"], 2*HistoryStep), 4/(HistoryStep+elapsed).Seconds(); got != want {
		t.Errorf("delivery rate at ok over two steps %v, want %v", got, want)
	}

	// Removed, bad keeps its series while they hold something.
	cfg.Targets = []TargetConfig{cfg.Targets[0], cfg.Targets[2]}
	if err := e.Update(cfg); err != nil {
		t.Fatalf("Update: %v", err)
	}
	if _, kept := e.History().Deliveries["bad"]; !kept {
		t.Error("a removed target's outcomes of the last hour are gone from the history")
	}
	clock.Advance(HistorySteps * HistoryStep)
	h = e.History()
	if _, kept := h.Deliveries["bad"]; kept {
		t.Error("a removed target's history is kept an hour after its last outcome")
	}
	if _, kept := h.Deliveries["ok"]; !kept {
		t.Error("a configured target's history is dropped while empty")
	}
}

// countingStore counts the store's Counts calls.
type countingStore struct {
	store.Store
	counts atomic.Int64
}

func (s *countingStore) Counts(ctx context.Context) (store.Counts, error) {
	s.counts.Add(1)
	return s.Store.Counts(ctx)
}

// TestOverviewSamplesPending: an Overview records the pending counts it
// read in the history, so a console page that shows both reads the
// store's counts once; History alone reads none.
func TestOverviewSamplesPending(t *testing.T) {
	clock := newFakeClock()
	down := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(http.StatusServiceUnavailable) })
	tc := fastTarget("down", down.URL)
	tc.BackoffMin, tc.BackoffMax = time.Hour, time.Hour
	cs := &countingStore{Store: store.NewMemory(store.MemoryOptions{Now: clock.Now})}
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{
		OpenStore: func() (store.Store, error) { return cs, nil }, Now: clock.Now})
	for _, id := range []string{"p1", "p2"} {
		mustAccept(t, e, v3Body(id))
	}
	before := cs.counts.Load()
	ov := e.Overview(t.Context())
	h := e.History()
	if got := cs.counts.Load() - before; got != 1 {
		t.Errorf("an Overview and a History read the counts %d times, want 1", got)
	}
	if len(ov.Targets) != 1 || ov.Targets[0].Pending != 2 {
		t.Fatalf("overview targets %+v, want down with 2 pending", ov.Targets)
	}
	if got := last(h.Pending["down"], 1)[0]; got != 2 {
		t.Errorf("pending at down in the history %d, want the overview's 2", got)
	}
}
