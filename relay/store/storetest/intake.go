package storetest

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// testAcceptDuplicate: one id twice is a duplicate and writes nothing of
// the second; Accept copies the body it is given.
func testAcceptDuplicate(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	ev := event(1, now)
	if dup := e.acceptWith(t, ev, []string{"a", "b"}, dayKey(ev)); dup {
		t.Fatal("first Accept: duplicate, want new")
	}
	// The caller reuses its buffer for the next request.
	ev.Body[0] = 'X'
	both := map[string]pend{"a": {Pending: 1, OldestPending: now}, "b": {Pending: 1, OldestPending: now}}
	e.wantCounts(t, 1, both)

	other := &store.Event{ID: id(1), ReceivedAt: now, ContentType: "text/plain", Body: []byte("other")}
	if dup := e.acceptWith(t, other, []string{"a", "c"}, dayKey(other)); !dup {
		t.Error("second Accept of one id: new, want duplicate")
	}
	e.wantCounts(t, 1, both)
	if !e.seen(t, id(1)) {
		t.Error("Seen(accepted event) = false")
	}
	if e.seen(t, id(2)) {
		t.Error("Seen(unknown event) = true")
	}
	for _, target := range []string{"a", "b"} {
		l := e.take(t, e.queue(t, target))
		wantLease(t, l, fresh(event(1, now), target), event(1, now))
		e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
	}
	e.none(t, e.queue(t, "c"), "a target only the duplicate named")
	e.wantCounts(t, 0, nil)
	// Delivered everywhere, the event is gone; its key is not.
	if dup := e.acceptWith(t, event(1, now), []string{"a"}, dayKey(ev)); !dup {
		t.Error("Accept after delivery, within the key's life: new, want duplicate")
	}
	e.wantCounts(t, 0, nil)
}

// testAcceptKeyExpiry: a key outlives its event until it expires, and then
// no longer makes a duplicate.
func testAcceptKeyExpiry(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	expiry := now.Add(e.keyTTL)
	ev := event(1, now)
	if e.acceptWith(t, ev, []string{"a"}, store.AcceptOptions{KeyExpiry: expiry}) {
		t.Fatal("Accept: duplicate, want new")
	}
	q := e.queue(t, "a")
	e.deliver(t, q)
	if !e.seen(t, id(1)) {
		t.Error("delivered event's key forgotten before its expiry")
	}
	if !e.acceptWith(t, event(1, now), []string{"a"}, store.AcceptOptions{KeyExpiry: expiry}) {
		t.Error("Accept before the key's expiry: new, want duplicate")
	}
	e.wantCounts(t, 0, nil)
	if !e.c.real {
		e.c.advanceTo(expiry.Add(-time.Nanosecond))
		if !e.seen(t, id(1)) {
			t.Error("key not seen a nanosecond before its expiry")
		}
	}
	e.after(t, expiry, "key still seen at its expiry", func() bool { return !e.seen(t, id(1)) })

	// An expired key no longer makes a duplicate, swept or not.
	later := e.c.Now()
	again := event(1, later)
	if e.acceptWith(t, again, []string{"a"}, dayKey(again)) {
		t.Fatal("Accept after the key expired: duplicate, want new")
	}
	if !e.seen(t, id(1)) {
		t.Error("re-accepted event not seen")
	}
	e.wantCounts(t, 1, map[string]pend{"a": {Pending: 1, OldestPending: later}})
	l := e.take(t, q)
	wantLease(t, l, fresh(again, "a"), again)
	e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
	e.wantCounts(t, 0, nil)
}

// testAcceptNoKey: without a key an event still dedupes while it is
// stored (pending or dead), and not once it is gone.
func testAcceptNoKey(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	e.acceptNoKey(t, event(1, now), "a", "b")
	if !e.acceptWith(t, event(1, now), []string{"a"}, store.AcceptOptions{}) {
		t.Error("stored event accepted twice")
	}
	if !e.seen(t, id(1)) {
		t.Error("Seen(stored event without a key) = false")
	}
	qa, qb := e.queue(t, "a"), e.queue(t, "b")
	l := e.take(t, qa)
	e.settle(t, l, store.Dead, e.attempt(l, 400, "400 Bad Request", time.Time{}))
	e.deliver(t, qb)
	e.wantCounts(t, 0, map[string]pend{"a": {Dead: 1}})
	// A dead letter keeps the event, and with it the dedupe.
	if !e.seen(t, id(1)) {
		t.Error("Seen(dead-lettered event without a key) = false")
	}
	if !e.acceptWith(t, event(1, now), []string{"a"}, store.AcceptOptions{}) {
		t.Error("dead-lettered event accepted again")
	}
	if n, err := e.s.DeleteDead(t.Context(), id(1), ""); err != nil || n != 1 {
		t.Fatalf("DeleteDead = %d, %v; want 1", n, err)
	}
	if e.seen(t, id(1)) {
		t.Error("event without a key seen once nothing holds it")
	}
	e.acceptNoKey(t, event(1, now), "a")
	e.wantCounts(t, 1, map[string]pend{"a": {Pending: 1, OldestPending: now}})
}

// testAcceptWithoutTargets: an event no target wants records its key
// only, and without a key nothing at all.
func testAcceptWithoutTargets(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	e.accept(t, event(1, now))
	if !e.seen(t, id(1)) {
		t.Error("key of an event no target wants not recorded")
	}
	if !e.acceptWith(t, event(1, now), nil, dayKey(event(1, now))) {
		t.Error("event no target wants accepted twice")
	}
	if !e.acceptWith(t, event(1, now), []string{"a"}, dayKey(event(1, now))) {
		t.Error("event no target wanted accepted again for a target")
	}
	e.wantCounts(t, 0, nil)
	e.none(t, e.queue(t, "a"), "only keys recorded")

	e.acceptNoKey(t, event(2, now))
	if e.seen(t, id(2)) {
		t.Error("event with neither targets nor a key seen")
	}
	e.acceptNoKey(t, event(2, now))
	e.wantCounts(t, 0, nil)
}

// testAcceptConcurrentOneID: one id from many requests at once is new
// exactly once, and a duplicate is only reported once the event is
// durable.
func testAcceptConcurrentOneID(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	const n = 32
	var fresh atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, 2*n)
	for range n {
		wg.Go(func() {
			<-start
			ev := event(1, now)
			dup, err := e.s.Accept(t.Context(), ev, []string{"a"}, dayKey(ev))
			if err != nil {
				errs <- err
				return
			}
			if !dup {
				fresh.Add(1)
				return
			}
			if seen, err := e.s.Seen(t.Context(), ev.ID, now); err != nil || !seen {
				errs <- errors.New("duplicate reported before the event was stored")
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := fresh.Load(); got != 1 {
		t.Fatalf("%d of %d concurrent Accepts of one id new, want exactly 1", got, n)
	}
	if h.Reopen != nil {
		// What any of them was told is durable.
		e.reopen(t)
	}
	e.wantCounts(t, 1, map[string]pend{"a": {Pending: 1, OldestPending: now}})
	q := e.queue(t, "a")
	e.deliver(t, q)
	e.none(t, q, "one event accepted once")
	e.wantCounts(t, 0, nil)
}

// testAcceptConcurrent: writers racing on overlapping events lose none and
// store none twice.
func testAcceptConcurrent(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	const writers, each = 8, 100
	var fresh atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				n := (i/2)*writers + w
				if i%2 == 1 {
					n = (i/2)*writers + (w+1)%writers // also sent by the next writer
				}
				ev := event(n, now)
				dup, err := e.s.Accept(t.Context(), ev, []string{"a"}, dayKey(ev))
				if err != nil {
					errs <- err
					return
				}
				if !dup {
					fresh.Add(1)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	const want = writers * each / 2
	if got := fresh.Load(); got != want {
		t.Errorf("%d events accepted as new, want %d", got, want)
	}
	e.wantCounts(t, want, map[string]pend{"a": {Pending: want, OldestPending: now}})
}

// testAcceptMaxPending: a full relay refuses new events with targets and
// writes nothing of them, still answers duplicates, and takes events again
// once some are no longer pending.
func testAcceptMaxPending(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	full := store.AcceptOptions{KeyExpiry: now.Add(24 * time.Hour), MaxPending: 2}
	if dup := e.acceptWith(t, event(1, now), []string{"a", "b"}, full); dup {
		t.Fatal("Accept(1) below the limit: duplicate")
	}
	if dup := e.acceptWith(t, event(2, now), []string{"c"}, full); dup {
		t.Fatal("Accept(2) below the limit: duplicate")
	}
	two := map[string]pend{"a": {Pending: 1, OldestPending: now}, "b": {Pending: 1, OldestPending: now}, "c": {Pending: 1, OldestPending: now}}
	e.wantCounts(t, 2, two)

	dup, err := e.s.Accept(t.Context(), event(3, now), []string{"a"}, full)
	if !errors.Is(err, store.ErrFull) || dup {
		t.Fatalf("Accept at the limit = %v, %v; want ErrFull", dup, err)
	}
	if e.seen(t, id(3)) {
		t.Error("refused event seen: its key or event was written")
	}
	if dup, err := e.s.Accept(t.Context(), event(1, now), []string{"a"}, full); err != nil || !dup {
		t.Errorf("duplicate at the limit = %v, %v; want a duplicate", dup, err)
	}
	if dup := e.acceptWith(t, event(4, now), nil, full); dup {
		t.Error("event without targets at the limit: duplicate")
	}
	e.wantCounts(t, 2, two)

	// Event 1 leaves the pending set: delivered at a, dead at b.
	e.deliver(t, e.queue(t, "a"))
	l := e.take(t, e.queue(t, "b"))
	e.settle(t, l, store.Dead, e.attempt(l, 410, "410 Gone", time.Time{}))
	e.wantCounts(t, 1, map[string]pend{"b": {Dead: 1}, "c": {Pending: 1, OldestPending: now}})
	err = e.eventually(func() error {
		dup, err := e.s.Accept(t.Context(), event(3, now), []string{"a"}, full)
		if err == nil && dup {
			t.Fatal("event refused at the limit is a duplicate later: it was written")
		}
		return err
	})
	if err != nil {
		t.Fatalf("Accept below the limit again: %v", err)
	}
	if _, err := e.s.Accept(t.Context(), event(5, now), []string{"a"}, full); !errors.Is(err, store.ErrFull) {
		t.Errorf("Accept at the limit again: %v, want ErrFull", err)
	}
	e.wantCounts(t, 2, map[string]pend{"a": {Pending: 1, OldestPending: now}, "b": {Dead: 1}, "c": {Pending: 1, OldestPending: now}})
}
