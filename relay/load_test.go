package relay

import (
	"fmt"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// gatedStore holds its backlog's Pending after `after` deliveries until
// the test opens the gate, so that a test can act while an engine loads.
type gatedStore struct {
	store.Store
	after   int
	reached chan struct{} // closed when Pending waits at the gate
	gate    chan struct{}
}

func (s *gatedStore) Backlog() (store.Backlog, error) {
	b, err := s.Store.Backlog()
	if err != nil {
		return nil, err
	}
	return &gatedBacklog{Backlog: b, s: s}, nil
}

type gatedBacklog struct {
	store.Backlog
	s *gatedStore
}

func (b *gatedBacklog) Pending(fn func(d *store.Delivery) error) error {
	n := 0
	return b.Backlog.Pending(func(d *store.Delivery) error {
		if n++; n == b.s.after {
			close(b.s.reached)
			<-b.s.gate
		}
		return fn(d)
	})
}

// fillStore stores n events pending at targets, with ids 1..n, and dead
// dead letters at deadAt.
func fillStore(t *testing.T, path string, n int, targets []string, dead int, deadAt string) (pending, deadIDs []store.ID) {
	t.Helper()
	st, err := store.OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now()
	for i := range n + dead {
		var id store.ID
		copy(id[:], fmt.Sprintf("ev-%013d", i))
		ev := &store.Event{ID: id, ReceivedAt: now.Add(time.Duration(i)), ContentType: "application/json", Body: []byte(`{"n":` + fmt.Sprint(i) + `}`)}
		to := targets
		if i >= n {
			to = []string{deadAt}
		}
		if _, err := st.Accept(ev, to, now.Add(time.Hour), now); err != nil {
			t.Fatal(err)
		}
		if i < n {
			pending = append(pending, id)
			continue
		}
		if _, err := st.Settle(&store.Delivery{ID: id, Target: deadAt, ReceivedAt: ev.ReceivedAt, Attempts: 1, LastStatus: 400}, store.Dead); err != nil {
			t.Fatal(err)
		}
		deadIDs = append(deadIDs, id)
	}
	return pending, deadIDs
}

// TestBacklogLoadsWhileServing: an engine takes events, replays, and drops
// a target while the backlog it opened with is still being queued; every
// delivery is queued once, none goes to the dropped target, and the
// gauges end where the store is.
func TestBacklogLoadsWhileServing(t *testing.T) {
	path := tempBolt(t)
	backlog, dead := fillStore(t, path, 300, []string{"a", "b"}, 20, "a")
	a := newTestTarget(t, nil)
	b := newTestTarget(t, nil)
	bolt, err := store.OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// Dead letters of a target the config no longer has.
	var gone []store.ID
	for i := range 3 {
		var id store.ID
		copy(id[:], fmt.Sprintf("gone-%011d", i))
		now := time.Now()
		if _, err := bolt.Accept(&store.Event{ID: id, ReceivedAt: now, Body: []byte(`{}`)}, []string{"gone"}, now.Add(time.Hour), now); err != nil {
			t.Fatal(err)
		}
		if _, err := bolt.Settle(&store.Delivery{ID: id, Target: "gone", ReceivedAt: now, Attempts: 1}, store.Dead); err != nil {
			t.Fatal(err)
		}
		gone = append(gone, id)
	}
	gs := &gatedStore{Store: bolt, after: 100, reached: make(chan struct{}), gate: make(chan struct{})}
	cfg := Config{Targets: []TargetConfig{fastTarget("a", a.URL), fastTarget("b", b.URL)}}
	e, err := New(cfg, Options{OpenStore: func() (store.Store, error) { return gs, nil }})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Open(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	if got := e.PendingEvents(); got != int64(len(backlog)) {
		t.Errorf("PendingEvents at open = %d, want %d (counted before the load)", got, len(backlog))
	}
	<-gs.reached

	// While loading: new events, a replay, a dead letter deleted, and
	// target b removed.
	var fresh []store.ID
	for i := range 30 {
		fresh = append(fresh, mustAccept(t, e, v3Body(fmt.Sprintf("new-%d", i))))
	}
	if n, err := e.Replay(nil, "a"); err != nil || n != len(dead) {
		t.Fatalf("Replay during the load = %d, %v; want %d", n, err, len(dead))
	}
	if n, err := e.DeleteDead(gone[0], "gone"); err != nil || n != 1 {
		t.Fatalf("DeleteDead during the load = %d, %v; want 1", n, err)
	}
	cfg.Targets = cfg.Targets[:1]
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.Loaded():
		t.Fatal("loaded while the backlog was held")
	default:
	}
	close(gs.gate)
	<-e.Loaded()

	want := len(backlog) + len(fresh) + len(dead)
	waitFor(t, "every delivery to a", 10*time.Second, func() bool { return a.count() >= want })
	waitFor(t, "no event pending", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	got := map[string]int{}
	for _, r := range a.requests() {
		got[r.Header.Get(HeaderIdempotencyKey)]++
	}
	for _, ids := range [][]store.ID{backlog, fresh, dead} {
		for _, id := range ids {
			if got[id.String()] != 1 {
				t.Errorf("event %s delivered %d times to a, want once", id, got[id.String()])
			}
		}
	}
	if len(got) != want || a.count() != want {
		t.Errorf("a got %d requests for %d events, want %d", a.count(), len(got), want)
	}
	inBacklog := map[string]bool{}
	for _, id := range backlog {
		inBacklog[id.String()] = true
	}
	for _, r := range b.requests() {
		if id := r.Header.Get(HeaderIdempotencyKey); inBacklog[id] {
			t.Errorf("removed target b got backlog event %s", id)
		}
	}

	stats, err := bolt.Stats(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if stats.Dead["gone"] != len(gone)-1 {
		t.Errorf("store holds %d dead letters at gone, want %d", stats.Dead["gone"], len(gone)-1)
	}
	for _, name := range []string{"a", "b", "gone"} {
		ts := targetStats(e, name)
		if ts.Pending != int64(stats.Pending[name]) || ts.DeadLetters != int64(stats.Dead[name]) {
			t.Errorf("target %s: gauges pending %d dead %d, store pending %d dead %d",
				name, ts.Pending, ts.DeadLetters, stats.Pending[name], stats.Dead[name])
		}
	}
	if stats.Dead["b"] < len(backlog) {
		t.Errorf("b holds %d dead letters, want at least the %d of the backlog", stats.Dead["b"], len(backlog))
	}
}

// TestCloseWhileLoading: Close stops the load and returns.
func TestCloseWhileLoading(t *testing.T) {
	path := tempBolt(t)
	fillStore(t, path, 50, []string{"a"}, 0, "")
	bolt, err := store.OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	gs := &gatedStore{Store: bolt, after: 10, reached: make(chan struct{}), gate: make(chan struct{})}
	down := newTestTarget(t, nil)
	e, err := New(Config{Targets: []TargetConfig{fastTarget("a", down.URL)}}, Options{OpenStore: func() (store.Store, error) { return gs, nil }})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Open(); err != nil {
		t.Fatal(err)
	}
	<-gs.reached
	closed := make(chan error, 1)
	go func() { closed <- e.Close() }()
	waitFor(t, "the engine to stop taking events", 5*time.Second, func() bool { return !e.IsOpen() })
	close(gs.gate)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	<-e.Loaded()
	if n := down.count(); n > 10 {
		t.Errorf("target got %d requests from a load stopped after 10", n)
	}
}
