package storetest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// testRetire: a retired queue stops handing out deliveries, waiting Takes
// included; a store of one instance makes its pending deliveries dead
// letters with the reason, a shared one leaves them for the instances that
// still have the target; a lease held meanwhile may still be settled, and
// asking for the queue again opens it again.
func testRetire(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	// Events without keys, so that Seen tells whether they are stored.
	for n := 1; n <= 3; n++ {
		targets := []string{"gone"}
		if n == 2 {
			targets = append(targets, "stay")
		}
		e.acceptNoKey(t, event(n, now), targets...)
	}
	q := e.queue(t, "gone")
	leases := e.takeN(t, q, 3)
	held := leases[id(1)]
	// On the real clock, long enough to retire the target before.
	later := e.c.Now().Add(10 * e.step)
	retried := e.attempt(leases[id(2)], 502, "502 Bad Gateway", later)
	retried.Attempts = 4
	e.settle(t, leases[id(2)], store.Retry, retried)
	leases[id(3)].Postpone(later)
	before := map[string]pend{"gone": {Pending: 3, OldestPending: now}, "stay": {Pending: 1, OldestPending: now}}

	waiting := make(chan error, 1)
	ctx, cancel := context.WithTimeout(t.Context(), waitLong)
	defer cancel()
	go func() {
		l, err := q.Take(ctx)
		if err == nil {
			err = errors.New("handed out " + num(l.Delivery().ID))
		}
		waiting <- err
	}()
	// The waiting Take finds nothing due until the retirement.
	e.none(t, q, "nothing due")

	const reason = "target removed from config"
	n, err := e.s.Retire(t.Context(), "gone", reason)
	if err != nil {
		t.Fatalf("Retire: %v", err)
	}
	select {
	case err := <-waiting:
		if !errors.Is(err, store.ErrClosed) {
			t.Errorf("Take waiting at the retirement: %v, want ErrClosed", err)
		}
	case <-time.After(waitLong):
		t.Fatal("Take waiting at the retirement did not return")
	}
	ctx, cancel = context.WithTimeout(t.Context(), waitLong)
	defer cancel()
	if _, err := q.Take(ctx); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Take on a retired queue: %v, want ErrClosed", err)
	}
	if n, err := e.s.Retire(t.Context(), "never-seen", reason); err != nil || n != 0 {
		t.Errorf("Retire(unknown target) = %d, %v; want 0", n, err)
	}

	if h.Shared {
		if n != 0 {
			t.Errorf("Retire on a shared store = %d, want 0: other instances deliver them", n)
		}
		e.wantCounts(t, 3, before)
		e.wantDead(t, "")
		// The held lease is settled as usual; the rest are there for
		// whoever takes the target's queue.
		e.settle(t, held, store.Delivered, e.attempt(held, 200, "", time.Time{}))
		e.wantCounts(t, 2, map[string]pend{"gone": {Pending: 2, OldestPending: now}, "stay": {Pending: 1, OldestPending: now}})
		q = e.queue(t, "gone")
		l := e.takeDue(t, q, later)
		l2 := e.take(t, q)
		for _, l := range []store.Lease{l, l2} {
			switch d := l.Delivery(); d.ID {
			case id(2):
				if diff := diffDelivery(d, *retried, false); diff != "" {
					t.Errorf("retried delivery after the retirement: %s", diff)
				}
			case id(3):
				if d.Attempts != 0 {
					t.Errorf("postponed delivery after the retirement: %d attempts, want 0", d.Attempts)
				}
			default:
				t.Errorf("Take after the retirement = %s, want 2 or 3", num(d.ID))
			}
			e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
		}
		e.wantCounts(t, 1, map[string]pend{"stay": {Pending: 1, OldestPending: now}})
		return
	}

	if n != 3 {
		t.Errorf("Retire = %d, want 3", n)
	}
	e.wantCounts(t, 1, map[string]pend{"gone": {Dead: 3}, "stay": {Pending: 1, OldestPending: now}})
	dead := e.allDead(t, "gone")
	if len(dead) != 3 {
		t.Fatalf("%d dead letters at the retired target, want 3", len(dead))
	}
	for _, dl := range dead {
		if dl.LastError != reason {
			t.Errorf("dead letter %s: last error %q, want %q", num(dl.ID), dl.LastError, reason)
		}
		if dl.ID == id(2) && (dl.Attempts != 4 || !dl.FirstAttemptAt.Equal(retried.FirstAttemptAt)) {
			t.Errorf("dead letter %s: %d attempts, first %s; want the %d made, first %s",
				num(dl.ID), dl.Attempts, fmtTime(dl.FirstAttemptAt), retried.Attempts, fmtTime(retried.FirstAttemptAt))
		}
		if want := fmt.Sprintf(`{"n":%s}`, num(dl.ID)); string(dl.Body) != want {
			t.Errorf("dead letter %s: body %q", num(dl.ID), dl.Body)
		}
	}
	// The attempt under way when the target was retired succeeded: its
	// dead letter goes, and the event with it.
	e.settle(t, held, store.Delivered, e.attempt(held, 200, "", time.Time{}))
	e.wantCounts(t, 1, map[string]pend{"gone": {Dead: 2}, "stay": {Pending: 1, OldestPending: now}})
	if e.seen(t, id(1)) {
		t.Error("event whose dead letter was delivered still stored")
	}
	// The target comes back.
	q = e.queue(t, "gone")
	ev := event(4, e.c.Now())
	e.acceptNoKey(t, ev, "gone")
	l := e.take(t, q)
	wantLease(t, l, fresh(ev, "gone"), ev)
	e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
	e.none(t, q, "a retired target's dead letters")
	e.wantCounts(t, 1, map[string]pend{"gone": {Dead: 2}, "stay": {Pending: 1, OldestPending: now}})
}
