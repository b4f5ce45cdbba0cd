package natsstore

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// migSource is a bbolt store a relay left, and what it holds.
type migSource struct {
	path string
	// e1 pending at a (retried: attempts, a next attempt to come) and b;
	// e2 pending at a, no key; e3 pending at a, dead at b; e4 dead at
	// b; e5 pending at a, its key expired; k1 a key alone; k2 an
	// expired key alone.
	e1, e2, e3, e4, e5 *store.Event
	k1, k2             store.ID
	retry              store.Delivery // e1's at a
	dead               map[store.ID]store.Delivery
}

func migEvent(name string, at time.Time) *store.Event {
	var id store.ID
	copy(id[:], "mig-"+name)
	return &store.Event{ID: id, ReceivedAt: at, ContentType: "application/json", Body: []byte(`{"event":"` + name + `"}`)}
}

func boltSettle(t *testing.T, l store.Lease, o store.Outcome, d *store.Delivery) {
	t.Helper()
	done := make(chan error, 1)
	l.Settle(o, d, func(err error) { done <- err })
	if err := <-done; err != nil {
		t.Fatalf("Settle(%s): %v", o, err)
	}
}

// takeAll takes n deliveries from q, by event id.
func takeAll(t *testing.T, q store.Queue, n int, within time.Duration) map[store.ID]store.Lease {
	t.Helper()
	got := map[store.ID]store.Lease{}
	for range n {
		l := take(t, q, within)
		got[l.Delivery().ID] = l
	}
	return got
}

func newMigSource(t *testing.T, nextAttempt time.Time) *migSource {
	t.Helper()
	now := time.Now()
	src := &migSource{
		path: filepath.Join(t.TempDir(), "relay.db"),
		e1:   migEvent("e1", now.Add(-5*time.Minute)),
		e2:   migEvent("e2", now.Add(-4*time.Minute)),
		e3:   migEvent("e3", now.Add(-3*time.Minute)),
		e4:   migEvent("e4", now.Add(-2*time.Minute)),
		e5:   migEvent("e5", now.Add(-time.Hour)),
		dead: map[store.ID]store.Delivery{},
	}
	b, err := store.OpenBolt(src.path, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	accept := func(e *store.Event, opts store.AcceptOptions, targets ...string) {
		t.Helper()
		if dup, err := b.Accept(ctxBG, e, targets, opts); err != nil || dup {
			t.Fatalf("Accept = %v, %v", dup, err)
		}
	}
	accept(src.e1, dayKey(src.e1), "a", "b")
	accept(src.e2, store.AcceptOptions{}, "a")
	accept(src.e3, dayKey(src.e3), "a", "b")
	accept(src.e4, dayKey(src.e4), "b")
	accept(src.e5, store.AcceptOptions{KeyExpiry: now.Add(-30 * time.Minute)}, "a")
	k1, k2 := migEvent("k1", now.Add(-time.Minute)), migEvent("k2", now.Add(-2*time.Hour))
	src.k1, src.k2 = k1.ID, k2.ID
	accept(k1, dayKey(k1))
	accept(k2, store.AcceptOptions{KeyExpiry: now.Add(-time.Hour)})

	qa, _ := b.Queue("a", store.QueueOptions{})
	for id, l := range takeAll(t, qa, 4, 5*time.Second) {
		if id != src.e1.ID {
			l.Postpone(l.Delivery().NextAt)
			continue
		}
		d := l.Delivery()
		d.Attempts, d.LastStatus, d.LastError = 2, 503, "upstream busy"
		d.FirstAttemptAt, d.LastAttemptAt, d.NextAt = now.Add(-4*time.Minute), now.Add(-time.Second), nextAttempt
		boltSettle(t, l, store.Retry, &d)
		src.retry = d
	}
	qb, _ := b.Queue("b", store.QueueOptions{})
	for id, l := range takeAll(t, qb, 3, 5*time.Second) {
		if id == src.e1.ID {
			l.Postpone(l.Delivery().NextAt)
			continue
		}
		d := l.Delivery()
		d.Attempts, d.LastStatus, d.LastError = 5, 500, "boom "+id.String()
		d.FirstAttemptAt, d.LastAttemptAt = now.Add(-time.Minute), now.Add(-time.Second)
		boltSettle(t, l, store.Dead, &d)
		src.dead[id] = d
	}
	if src.retry.Attempts == 0 || len(src.dead) != 2 {
		t.Fatalf("source not as planned: retry %+v, dead %d", src.retry, len(src.dead))
	}
	return src
}

func (src *migSource) open(t *testing.T) *store.Bolt {
	t.Helper()
	b, err := store.OpenBoltExisting(src.path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// migTarget is a NATS server with the relay's stream made with a 100 ms
// Nats-Msg-Id window, so that the tests cannot pass by leaning on it.
func migTarget(t *testing.T) (*natsServer, *Store) {
	t.Helper()
	ns := startNATS(t)
	cfg := testConfig(ns.url(), nil)
	nc, err := nats.Connect(ns.url())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	sc := (&Store{cfg: Config{Replicas: 1}, n: namesFor(cfg.Stream)}).streamConfig()
	sc.Duplicates = 100 * time.Millisecond
	if _, err := js.CreateStream(ctxBG, sc); err != nil {
		t.Fatal(err)
	}
	s := openUp(t, cfg)
	t.Cleanup(func() { s.Close() })
	return ns, s
}

// streamMsgs counts the messages of the deliveries' and dead letters'
// streams.
func streamMsgs(t *testing.T, s *Store) (pending, dead uint64) {
	t.Helper()
	obj, err := s.ready()
	if err != nil {
		t.Fatal(err)
	}
	pi, err := obj.stream.Info(ctxBG)
	if err != nil {
		t.Fatal(err)
	}
	di, err := obj.dead.Info(ctxBG)
	if err != nil {
		t.Fatal(err)
	}
	return pi.State.Msgs, di.State.Msgs
}

func migrate(t *testing.T, ctx context.Context, b *store.Bolt, s *Store, opts MigrateOptions) MigrateSummary {
	t.Helper()
	sum, err := Migrate(ctx, b, s, opts)
	if err != nil {
		t.Fatalf("Migrate: %v (so far %+v)", err, sum)
	}
	return sum
}

// everything is the summary of a first run over a migSource.
var everything = MigrateSummary{Pending: 5, Dead: 2, Keys: 4, KeysExpired: 2}

func TestMigrate(t *testing.T) {
	nextAttempt := time.Now().Add(4 * time.Second)
	src := newMigSource(t, nextAttempt)
	b := src.open(t)
	if _, err := store.OpenBoltExisting(src.path, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "is a Caddy still using it?") {
		t.Errorf("OpenBoltExisting of a file in use = %v, want a lock error asking about Caddy", err)
	}
	if _, err := store.OpenBoltExisting(filepath.Join(t.TempDir(), "relay.db"), time.Second); err == nil {
		t.Error("OpenBoltExisting of no file = nil, want an error")
	}

	if sum, err := Migrate(ctxBG, b, nil, MigrateOptions{DryRun: true}); err != nil || sum != everything {
		t.Errorf("dry run = %+v, %v; want %+v", sum, err, everything)
	}
	_, s := migTarget(t)
	if p, d := streamMsgs(t, s); p != 0 || d != 0 {
		t.Fatalf("streams hold %d, %d before the run", p, d)
	}

	if sum := migrate(t, ctxBG, b, s, MigrateOptions{}); sum != everything {
		t.Errorf("first run = %+v, want %+v", sum, everything)
	}
	again := MigrateSummary{PendingSkipped: 5, DeadSkipped: 2, KeysSkipped: 4, KeysExpired: 2}
	if sum := migrate(t, ctxBG, b, s, MigrateOptions{}); sum != again {
		t.Errorf("second run = %+v, want %+v", sum, again)
	}
	if p, d := streamMsgs(t, s); p != 5 || d != 2 {
		t.Errorf("streams hold %d deliveries and %d dead letters, want 5 and 2", p, d)
	}

	c, err := s.Counts(ctxBG)
	if err != nil {
		t.Fatal(err)
	}
	if c.PendingEvents != 4 || c.Targets["a"].Pending != 4 || c.Targets["b"].Pending != 1 || c.Targets["b"].Dead != 2 ||
		!c.Targets["a"].OldestPending.Equal(src.e5.ReceivedAt) {
		t.Errorf("counts = %+v", c)
	}

	for _, tt := range []struct {
		id   store.ID
		seen bool
	}{
		{src.e1.ID, true}, {src.e2.ID, true}, {src.e4.ID, true}, {src.e5.ID, true}, // stored
		{src.k1, true},
		{src.k2, false}, // expired: not copied
	} {
		if seen, err := s.Seen(ctxBG, tt.id, time.Now()); err != nil || seen != tt.seen {
			t.Errorf("Seen(%s) = %v, %v; want %v", tt.id, seen, err, tt.seen)
		}
	}

	list, _, err := s.DeadLetters(ctxBG, "", "", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 {
		t.Fatalf("%d dead letters, want 2", len(list))
	}
	for _, dl := range list {
		want, ok := src.dead[dl.ID]
		ev := map[store.ID]*store.Event{src.e3.ID: src.e3, src.e4.ID: src.e4}[dl.ID]
		if !ok || ev == nil || dl.Target != "b" || dl.Attempts != want.Attempts || dl.LastStatus != want.LastStatus ||
			dl.LastError != want.LastError || !dl.LastAttemptAt.Equal(want.LastAttemptAt) || !dl.FirstAttemptAt.Equal(want.FirstAttemptAt) ||
			!dl.ReceivedAt.Equal(ev.ReceivedAt) || dl.ContentType != ev.ContentType || !bytes.Equal(dl.Body, ev.Body) {
			t.Errorf("dead letter %+v (body %s), want %+v of %s", dl.Delivery, dl.Body, want, ev.Body)
		}
	}

	// Every pending delivery, with its event; e1's at a with its attempts
	// and not before its next attempt.
	qa, err := s.Queue("a", store.QueueOptions{Lease: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	qb, err := s.Queue("b", store.QueueOptions{Lease: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	events := map[store.ID]*store.Event{src.e1.ID: src.e1, src.e2.ID: src.e2, src.e3.ID: src.e3, src.e5.ID: src.e5}
	var leases []store.Lease
	check := func(l store.Lease, target string) {
		t.Helper()
		d, got := l.Delivery(), l.Event()
		want := events[d.ID]
		if want == nil || d.Target != target || !d.ReceivedAt.Equal(want.ReceivedAt) || got.ContentType != want.ContentType || !bytes.Equal(got.Body, want.Body) {
			t.Errorf("took %+v (body %s) at %s", d, got.Body, target)
		}
		if d.ID == src.e1.ID && target == "a" {
			r := src.retry
			if d.Attempts != r.Attempts || d.LastStatus != r.LastStatus || d.LastError != r.LastError ||
				!d.FirstAttemptAt.Equal(r.FirstAttemptAt) || !d.LastAttemptAt.Equal(r.LastAttemptAt) || !d.NextAt.Equal(r.NextAt) {
				t.Errorf("retried delivery taken as %+v, want %+v (a first delivery with a Relay-Delivery header must read its attempt record)", d, r)
			}
			if early := time.Until(nextAttempt); early > 20*time.Millisecond {
				t.Errorf("retried delivery taken %s before its next attempt", early)
			}
		} else if d.Attempts != 0 {
			t.Errorf("delivery %s at %s taken with %d attempts, want 0", d.ID, target, d.Attempts)
		}
		leases = append(leases, l)
	}
	for _, l := range takeAll(t, qa, 3, 3*time.Second) {
		if l.Delivery().ID == src.e1.ID && time.Until(nextAttempt) > 20*time.Millisecond {
			t.Errorf("e1 taken at a %s before its next attempt", time.Until(nextAttempt))
		}
		check(l, "a")
	}
	check(take(t, qa, 10*time.Second), "a")
	check(take(t, qb, 3*time.Second), "b")
	for _, l := range leases {
		d := l.Delivery()
		d.Attempts++
		done := make(chan error, 1)
		l.Settle(store.Delivered, &d, func(err error) { done <- err })
		if err := <-done; err != nil {
			t.Fatalf("Settle: %v", err)
		}
	}
	if p, _ := streamMsgs(t, s); p != 0 {
		t.Fatalf("%d deliveries left after delivering them all", p)
	}

	// Delivered from NATS since: another run (well past the window)
	// stores none of it again, with a key or without.
	if sum := migrate(t, ctxBG, b, s, MigrateOptions{}); sum != again {
		t.Errorf("run after delivery = %+v, want %+v", sum, again)
	}
	if p, d := streamMsgs(t, s); p != 0 || d != 2 {
		t.Errorf("streams hold %d deliveries and %d dead letters after a run past delivery, want 0 and 2", p, d)
	}
	// What marks e2 (no key) and e5 (an expired one) as copied does not
	// count as seen: sent again, each is new.
	for _, e := range []*store.Event{src.e2, src.e5} {
		if seen, err := s.Seen(ctxBG, e.ID, time.Now()); err != nil || seen {
			t.Errorf("Seen(%s) after delivery = %v, %v; want false", e.ID, seen, err)
		}
		again := *e
		again.ReceivedAt = time.Now()
		if dup, err := s.Accept(ctxBG, &again, []string{"a"}, store.AcceptOptions{}); err != nil || dup {
			t.Errorf("Accept(%s) after migration and delivery = %v, %v; want new", e.ID, dup, err)
		}
	}
}

// TestMigrateInterrupted: a run stopped half way through an event (one
// of its two deliveries stored), then a full run: every delivery, dead
// letter and key is stored once, the retried delivery with its attempts.
func TestMigrateInterrupted(t *testing.T) {
	src := newMigSource(t, time.Now().Add(time.Hour))
	b := src.open(t)
	_, s := migTarget(t)

	ctx, cancel := context.WithCancel(ctxBG)
	defer cancel()
	// Oldest first: e5 at a, then e1 at a; stop before e1 at b.
	var calls int
	first, err := Migrate(ctx, b, s, MigrateOptions{Progress: func(sum MigrateSummary) {
		calls++
		if sum.Pending == 2 {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted Migrate = %v, want context.Canceled", err)
	}
	if first.Pending != 2 || first.Dead != 0 || first.Keys != 0 || calls != 2 {
		t.Fatalf("interrupted run = %+v after %d steps, want 2 deliveries after 2", first, calls)
	}
	if p, d := streamMsgs(t, s); p != 2 || d != 0 {
		t.Fatalf("streams hold %d, %d after the interrupted run, want 2, 0", p, d)
	}

	second := migrate(t, ctxBG, b, s, MigrateOptions{})
	// e5 is marked as copied; e1 at a was stored, not yet marked.
	want := MigrateSummary{Pending: 3, PendingSkipped: 2, Dead: 2, Keys: 4, KeysExpired: 2}
	if second != want {
		t.Errorf("full run after the interrupted one = %+v, want %+v", second, want)
	}
	if p, d := streamMsgs(t, s); p != 5 || d != 2 {
		t.Errorf("streams hold %d deliveries and %d dead letters, want 5 and 2", p, d)
	}
	obj, _ := s.ready()
	e, err := obj.attempts.Get(ctxBG, attemptKey("a", src.e1.ID))
	if err != nil {
		t.Fatalf("attempt record of e1 at a: %v", err)
	}
	var d store.Delivery
	if err := decodeRecord(e.Value(), &d); err != nil || d.Attempts != src.retry.Attempts || !d.NextAt.Equal(src.retry.NextAt) {
		t.Errorf("attempt record of e1 at a = %+v, %v; want %+v", d, err, src.retry)
	}
	if _, err := obj.attempts.Get(ctxBG, attemptKey("b", src.e1.ID)); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("attempt record of e1 at b (no attempts) = %v, want none", err)
	}
	third := migrate(t, ctxBG, b, s, MigrateOptions{})
	if third != (MigrateSummary{PendingSkipped: 5, DeadSkipped: 2, KeysSkipped: 4, KeysExpired: 2}) {
		t.Errorf("third run = %+v, want everything skipped", third)
	}
}
