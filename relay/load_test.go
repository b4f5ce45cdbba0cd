package relay

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// settleNow settles a lease and waits until the outcome is durable.
func settleNow(t testing.TB, l store.Lease, o store.Outcome, d *store.Delivery) {
	t.Helper()
	done := make(chan error, 1)
	l.Settle(o, d, func(err error) { done <- err })
	if err := <-done; err != nil {
		t.Fatalf("Settle(%s, %v): %v", d.ID, o, err)
	}
}

// takeNow takes the next due delivery of target, failing the test if
// none comes within five seconds.
func takeNow(t testing.TB, st store.Store, target string) store.Lease {
	t.Helper()
	q, err := st.Queue(target, store.QueueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := q.Take(ctx)
	if err != nil {
		t.Fatalf("Take(%s): %v", target, err)
	}
	return l
}

// deadLetter stores an event with one delivery at target and makes it a
// dead letter after one attempt answered 400.
func deadLetter(t testing.TB, st store.Store, id store.ID, target string, at time.Time) {
	t.Helper()
	ev := &store.Event{ID: id, ReceivedAt: at, ContentType: "application/json", Body: []byte(`{}`)}
	if _, err := st.Accept(context.Background(), ev, []string{target}, store.AcceptOptions{KeyExpiry: at.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	l := takeNow(t, st, target)
	d := l.Delivery()
	if d.ID != id {
		t.Fatalf("took %s, want the dead letter-to-be %s", d.ID, id)
	}
	d.Attempts, d.LastStatus, d.LastAttemptAt = 1, 400, at
	settleNow(t, l, store.Dead, &d)
}

// fillStore stores dead dead letters at deadAt, then n events pending at
// targets.
func fillStore(t *testing.T, path string, n int, targets []string, dead int, deadAt string) (pending, deadIDs []store.ID) {
	t.Helper()
	st, err := store.OpenBolt(path, store.BoltOptions{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now()
	for i := range dead {
		var id store.ID
		copy(id[:], fmt.Sprintf("dl-%013d", i))
		deadLetter(t, st, id, deadAt, now.Add(time.Duration(i)))
		deadIDs = append(deadIDs, id)
	}
	for i := range n {
		var id store.ID
		copy(id[:], fmt.Sprintf("ev-%013d", i))
		ev := &store.Event{ID: id, ReceivedAt: now.Add(time.Duration(dead + i)), ContentType: "application/json", Body: []byte(`{"n":` + fmt.Sprint(i) + `}`)}
		if _, err := st.Accept(context.Background(), ev, targets, store.AcceptOptions{KeyExpiry: now.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		pending = append(pending, id)
	}
	return pending, deadIDs
}

// TestBacklogLoadsWhileServing: an engine takes events, replays, and drops
// a target right after it opened on a backlog (the store queues its
// backlog in the background, so these usually happen while it does);
// every delivery is made once, none goes to the dropped target, and the
// gauges end where the store is.
func TestBacklogLoadsWhileServing(t *testing.T) {
	path := tempBolt(t)
	backlog, dead := fillStore(t, path, 3000, []string{"a", "b"}, 20, "a")
	a := newTestTarget(t, nil)
	b := newTestTarget(t, nil)
	bolt, err := store.OpenBolt(path, store.BoltOptions{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// Dead letters of a target the config no longer has.
	var gone []store.ID
	for i := range 3 {
		var id store.ID
		copy(id[:], fmt.Sprintf("gone-%011d", i))
		deadLetter(t, bolt, id, "gone", time.Now())
		gone = append(gone, id)
	}
	cfg := Config{Targets: []TargetConfig{fastTarget("a", a.URL), fastTarget("b", b.URL)}}
	e, err := New(cfg, Options{OpenStore: func() (store.Store, error) { return bolt, nil }})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Open(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	if got := e.PendingEvents(); got != int64(len(backlog)) {
		t.Errorf("PendingEvents at open = %d, want %d (kept, not counted by the load)", got, len(backlog))
	}

	// Right after the open: new events, a replay, a dead letter deleted,
	// and target b removed.
	var fresh []store.ID
	for i := range 30 {
		fresh = append(fresh, mustAccept(t, e, v3Body(fmt.Sprintf("new-%d", i))))
	}
	if n, err := e.Replay(t.Context(), nil, "a"); err != nil || n != len(dead) {
		t.Fatalf("Replay during the load = %d, %v; want %d", n, err, len(dead))
	}
	if n, err := e.DeleteDead(t.Context(), gone[0], "gone"); err != nil || n != 1 {
		t.Fatalf("DeleteDead during the load = %d, %v; want 1", n, err)
	}
	cfg.Targets = cfg.Targets[:1]
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.Loaded():
		t.Log("the backlog was loaded before the test acted")
	default:
	}
	<-e.Loaded()

	want := len(backlog) + len(fresh) + len(dead)
	waitFor(t, "every delivery to a", 20*time.Second, func() bool { return a.count() >= want })
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
	delivered := map[string]bool{}
	for _, r := range b.requests() {
		id := r.Header.Get(HeaderIdempotencyKey)
		if delivered[id] {
			t.Errorf("removed target b got event %s twice", id)
		}
		delivered[id] = true
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
	if got := stats.Dead["b"] + len(delivered); got != len(backlog)+len(fresh) {
		t.Errorf("b: %d dead letters and %d delivered, want the %d events it was owed", stats.Dead["b"], len(delivered), len(backlog)+len(fresh))
	}
}

// TestCloseWhileLoading: Close right after an open on a large backlog
// stops the workers and returns, leaving the backlog pending.
func TestCloseWhileLoading(t *testing.T) {
	path := tempBolt(t)
	backlog, _ := fillStore(t, path, 5000, []string{"a"}, 0, "")
	slow := newTestTarget(t, nil)
	e, err := New(Config{Targets: []TargetConfig{fastTarget("a", slow.URL)}}, Options{OpenStore: boltStore(path)})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Open(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	<-e.Loaded()
	st, err := store.OpenBolt(path, store.BoltOptions{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	stats, err := st.Stats(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if got := stats.Pending["a"] + slow.count(); got < len(backlog) {
		t.Errorf("%d pending and %d delivered after Close during the load, want the %d of the backlog", stats.Pending["a"], slow.count(), len(backlog))
	}
}
