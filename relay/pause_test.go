package relay

import (
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// pausedPair is a relay with two targets that take every event: "held",
// which the test pauses, and "free", which shows that the workers run,
// so that "held got nothing" is checked once "free" got everything.
func pausedPair(t *testing.T) (cfg Config, held, free *testTarget) {
	t.Helper()
	held = newTestTarget(t, nil)
	free = newTestTarget(t, nil)
	return Config{Targets: []TargetConfig{fastTarget("held", held.URL), fastTarget("free", free.URL)}}, held, free
}

// sendWhilePaused accepts n events at e, waits until free got them, and
// checks that held got none meanwhile and that they wait at held with no
// attempt used.
func sendWhilePaused(t *testing.T, e *Engine, held, free *testTarget, prefix string, n int) []store.ID {
	t.Helper()
	before, heldBefore := free.count(), held.count()
	var ids []store.ID
	for i := range n {
		ids = append(ids, mustAccept(t, e, v3Body(fmt.Sprintf("%s-%d", prefix, i))))
	}
	waitFor(t, "free to get every event", 5*time.Second, func() bool { return free.count() == before+n })
	if got := held.count() - heldBefore; got != 0 {
		t.Fatalf("paused target got %d requests, want none", got)
	}
	list, _, err := e.Pending(t.Context(), "held", "", 100)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range list {
		if d.Attempts != 0 {
			t.Errorf("pending %s at held: %d attempts made while paused, want 0", d.ID, d.Attempts)
		}
	}
	return ids
}

// waitPaused waits until e shows target paused (or not).
func waitPaused(t *testing.T, e *Engine, target string, paused bool) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%s paused=%v", target, paused), 5*time.Second, func() bool {
		return targetStats(e, target).Paused == paused
	})
}

// TestPauseHoldsAndResumeSends: a paused target gets no attempts while
// its deliveries wait (the other target gets its own), and a resume
// sends them all, each as its first attempt.
func TestPauseHoldsAndResumeSends(t *testing.T) {
	cfg, held, free := pausedPair(t)
	e := openEngine(t, cfg, Options{OpenStore: memStore()})
	if err := e.Pause(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	if !targetStats(e, "held").Paused || targetStats(e, "free").Paused {
		t.Fatalf("overview %+v, want held paused and free not", e.Overview(t.Context()).Targets)
	}
	// Pausing twice changes nothing.
	if err := e.Pause(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	ids := sendWhilePaused(t, e, held, free, "p", 5)
	if s := targetStats(e, "held"); s.Pending != 5 || s.DeadLetters != 0 {
		t.Errorf("held: %d pending, %d dead, want 5 and 0", s.Pending, s.DeadLetters)
	}
	if err := e.Resume(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "held to get every event", 5*time.Second, func() bool { return held.count() == len(ids) })
	for _, r := range held.requests() {
		if got := r.Header.Get(HeaderAttempt); got != "1" {
			t.Errorf("request %s: attempt %s, want 1 (waiting uses none)", r.Header.Get(HeaderIdempotencyKey), got)
		}
	}
	waitFor(t, "nothing pending", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	if targetStats(e, "held").Paused {
		t.Error("held still shows paused after Resume")
	}
}

// TestPauseWorkersInQueue: a pause reaches workers already waiting in the
// queue (nothing due when it came): the next event waits too.
func TestPauseWorkersInQueue(t *testing.T) {
	cfg, held, free := pausedPair(t)
	e := openEngine(t, cfg, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("first"))
	// At both targets: sendWhilePaused counts free's requests from here.
	waitFor(t, "the first event at both targets", 5*time.Second, func() bool { return held.count() == 1 && free.count() == 1 })
	if err := e.Pause(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	sendWhilePaused(t, e, held, free, "q", 3)
}

// TestPauseUnknownTarget: pausing or resuming a target the config does
// not have is an error, and so is a closed engine.
func TestPauseUnknownTarget(t *testing.T) {
	cfg, _, _ := pausedPair(t)
	e := openEngine(t, cfg, Options{OpenStore: memStore()})
	for _, f := range []func() error{
		func() error { return e.Pause(t.Context(), "nope") },
		func() error { return e.Resume(t.Context(), "nope") },
	} {
		if err := f(); !errors.Is(err, ErrUnknownTarget) {
			t.Errorf("got %v, want ErrUnknownTarget", err)
		}
	}
	if _, _, err := e.Pending(t.Context(), "nope", "", 10); !errors.Is(err, ErrUnknownTarget) {
		t.Errorf("Pending of an unknown target: %v, want ErrUnknownTarget", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Pause(t.Context(), "held"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Pause on a closed engine: %v, want ErrUnavailable", err)
	}
}

// TestPauseSurvivesRestartAndReload: on bbolt, a pause holds after the
// engine restarts (nothing goes out in the meantime), after a reload that
// changes the target, and after one that removes it and adds it back.
func TestPauseSurvivesRestartAndReload(t *testing.T) {
	cfg, held, free := pausedPair(t)
	path := tempBolt(t)
	e1, err := New(cfg, Options{OpenStore: boltStore(path)})
	if err != nil {
		t.Fatal(err)
	}
	if err := e1.Open(); err != nil {
		t.Fatal(err)
	}
	if err := e1.Pause(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	sendWhilePaused(t, e1, held, free, "before", 3)
	if err := e1.Close(); err != nil {
		t.Fatal(err)
	}

	e2 := openEngine(t, cfg, Options{OpenStore: boltStore(path)})
	waitPaused(t, e2, "held", true)
	if s := targetStats(e2, "held"); s.Pending != 3 {
		t.Errorf("held after the restart: %d pending, want 3", s.Pending)
	}
	sendWhilePaused(t, e2, held, free, "after", 2)

	// A reload that changes the target keeps its pause.
	changed := cfg
	changed.Targets = append([]TargetConfig(nil), cfg.Targets...)
	changed.Targets[0].Headers = http.Header{"X-Changed": {"1"}}
	if err := e2.Update(changed); err != nil {
		t.Fatal(err)
	}
	sendWhilePaused(t, e2, held, free, "changed", 1)

	// Removed and added back: the record outlives the target.
	only := Config{Targets: []TargetConfig{cfg.Targets[1]}}
	if err := e2.Update(only); err != nil {
		t.Fatal(err)
	}
	if err := e2.Update(changed); err != nil {
		t.Fatal(err)
	}
	waitPaused(t, e2, "held", true)
	sendWhilePaused(t, e2, held, free, "readded", 2)

	if err := e2.Resume(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	// The two events accepted since the target came back; the ones before
	// became dead letters when it was removed (a store of one instance).
	waitFor(t, "held to get the events accepted since it came back", 5*time.Second, func() bool { return held.count() == 2 })
	waitFor(t, "nothing pending", 5*time.Second, func() bool { return e2.PendingEvents() == 0 })
	for _, dl := range deadLetters(t, e2) {
		if dl.LastError != ReasonTargetRemoved {
			t.Errorf("dead letter %s: %q, want %q", dl.ID, dl.LastError, ReasonTargetRemoved)
		}
	}
}

// TestPauseSharedStore: two engines on one shared store (two instances
// of a relay): a pause made at one holds the target at both, and a
// resume at the other releases it at both.
func TestPauseSharedStore(t *testing.T) {
	cfg, held, free := pausedPair(t)
	shared := sharedMemory{store.NewMemory(store.MemoryOptions{})}
	open := func() (store.Store, error) { return shared, nil }
	e1 := openEngine(t, cfg, Options{OpenStore: open})
	e2 := openEngine(t, cfg, Options{OpenStore: open})
	if err := e1.Pause(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	waitPaused(t, e2, "held", true)
	sendWhilePaused(t, e2, held, free, "two", 3)
	sendWhilePaused(t, e1, held, free, "one", 3)
	if err := e2.Resume(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	waitPaused(t, e1, "held", false)
	waitFor(t, "held to get every event", 5*time.Second, func() bool { return held.count() == 6 })
	waitFor(t, "nothing pending", 5*time.Second, func() bool { return e1.PendingEvents() == 0 })
}

// TestPauseMaxAge: a paused target's deliveries past max_age become dead
// letters (none sent, no attempt used); younger ones wait, and go out on
// resume.
func TestPauseMaxAge(t *testing.T) {
	clock := newFakeClock()
	cfg, held, free := pausedPair(t)
	cfg.Targets[0].MaxAge = time.Hour
	e := openEngine(t, cfg, Options{OpenStore: memStore(clock.Now), Now: clock.Now})
	if err := e.Pause(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	old := sendWhilePaused(t, e, held, free, "old", 3)
	clock.Advance(50 * time.Minute)
	young := sendWhilePaused(t, e, held, free, "young", 2)
	clock.Advance(20 * time.Minute) // the old ones are 70 minutes old
	waitFor(t, "the old deliveries dead-lettered", 10*time.Second, func() bool { return targetStats(e, "held").DeadLetters == 3 })
	dead := map[store.ID]bool{}
	for _, dl := range deadLetters(t, e) {
		dead[dl.ID] = true
		if dl.Target != "held" || dl.LastError != ReasonMaxAgeExceeded || dl.Attempts != 0 {
			t.Errorf("dead letter %s at %s: %q after %d attempts, want %q after 0 at held",
				dl.ID, dl.Target, dl.LastError, dl.Attempts, ReasonMaxAgeExceeded)
		}
	}
	for _, id := range old {
		if !dead[id] {
			t.Errorf("old event %s is not a dead letter", id)
		}
	}
	if s := targetStats(e, "held"); s.Pending != 2 || held.count() != 0 {
		t.Errorf("held: %d pending, %d requests; want the 2 young ones pending and none sent", s.Pending, held.count())
	}
	if err := e.Resume(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the young ones delivered", 5*time.Second, func() bool { return held.count() == len(young) })
	want := map[string]bool{}
	for _, id := range young {
		want[id.String()] = true
	}
	for _, r := range held.requests() {
		if k := r.Header.Get(HeaderIdempotencyKey); !want[k] {
			t.Errorf("held got %s, not one of the young events", k)
		}
	}
}
