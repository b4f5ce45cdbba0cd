package storetest

import (
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// testSettleTwice: settling a delivery that is no longer pending, or that
// was deleted, changes nothing and is not an error.
func testSettleTwice(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	for n := 1; n <= 3; n++ {
		e.acceptNoKey(t, event(n, now), "a")
	}
	q := e.queue(t, "a")
	leases := e.takeN(t, q, 3)
	e.none(t, q, "everything leased")
	// again settles l once more and checks that nothing changed.
	again := func(l store.Lease, o store.Outcome, d *store.Delivery, events int, targets map[string]pend) {
		t.Helper()
		e.settle(t, l, o, d)
		e.wantCounts(t, events, targets)
	}

	l := leases[id(1)]
	delivered := e.attempt(l, 200, "", time.Time{})
	e.settle(t, l, store.Delivered, delivered)
	two := map[string]pend{"a": {Pending: 2, OldestPending: now}}
	e.wantCounts(t, 2, two)
	again(l, store.Delivered, delivered, 2, two)
	if e.seen(t, id(1)) {
		t.Error("delivered event without a key still stored")
	}

	l = leases[id(2)]
	dead := e.attempt(l, 500, "500 Internal Server Error", time.Time{})
	e.settle(t, l, store.Dead, dead)
	withDead := map[string]pend{"a": {Pending: 1, Dead: 1, OldestPending: now}}
	e.wantCounts(t, 1, withDead)
	later := *dead
	later.Attempts, later.LastStatus, later.LastError = 9, 502, "502 Bad Gateway"
	again(l, store.Dead, &later, 1, withDead)
	later.NextAt = e.c.Now()
	again(l, store.Retry, &later, 1, withDead)
	e.wantDead(t, "a", deadLetter(dead, event(2, now)))

	l = leases[id(3)]
	e.settle(t, l, store.Dead, e.attempt(l, 500, "500 Internal Server Error", time.Time{}))
	if n, err := e.s.DeleteDead(t.Context(), id(3), "a"); err != nil || n != 1 {
		t.Fatalf("DeleteDead = %d, %v; want 1", n, err)
	}
	gone := map[string]pend{"a": {Dead: 1}}
	e.wantCounts(t, 0, gone)
	retry := e.attempt(l, 503, "503 Service Unavailable", e.c.Now())
	for _, o := range []store.Outcome{store.Retry, store.Dead, store.Delivered} {
		again(l, o, retry, 0, gone)
	}
	if e.seen(t, id(3)) {
		t.Error("deleted event stored again by a later Settle")
	}
	e.wantDead(t, "", deadLetter(dead, event(2, now)))
	e.none(t, q, "nothing pending")
}

// testSettleThen: then reports an outcome once it is visible, whether one
// Settle is waited for or several are in flight at once.
func testSettleThen(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	ev := event(1, now)
	e.accept(t, ev, "a", "b")
	la, lb := e.take(t, e.queue(t, "a")), e.take(t, e.queue(t, "b"))

	dead := e.attempt(la, 422, "422 Unprocessable Entity", time.Time{})
	if err := wait(t, e.settleAsync(la, store.Dead, dead), "Settle(dead)"); err != nil {
		t.Fatalf("Settle(dead): %v", err)
	}
	// Nothing polled: then came after the write.
	list, _, err := e.s.DeadLetters(t.Context(), "a", "", 10)
	if err != nil || len(list) != 1 || list[0].ID != ev.ID {
		t.Errorf("DeadLetters once then ran = %d dead letters, %v; want %s", len(list), err, num(ev.ID))
	}
	e.wantCounts(t, 1, map[string]pend{"a": {Dead: 1}, "b": {Pending: 1, OldestPending: now}})
	e.settle(t, lb, store.Delivered, e.attempt(lb, 200, "", time.Time{}))
	e.wantCounts(t, 0, map[string]pend{"a": {Dead: 1}})

	// Outcomes nobody waits for between them, then an Accept behind them:
	// all are recorded, each reported once.
	for n := 2; n <= 4; n++ {
		e.accept(t, event(n, now), "c")
	}
	q := e.queue(t, "c")
	leases := e.takeN(t, q, 3)
	next := e.c.Now().Add(e.step)
	retry := e.attempt(leases[id(2)], 503, "503 Service Unavailable", next)
	pending := []<-chan error{
		e.settleAsync(leases[id(2)], store.Retry, retry),
		e.settleAsync(leases[id(3)], store.Delivered, e.attempt(leases[id(3)], 200, "", time.Time{})),
		e.settleAsync(leases[id(4)], store.Dead, e.attempt(leases[id(4)], 400, "400 Bad Request", time.Time{})),
	}
	e.accept(t, event(5, now), "d")
	for _, ch := range pending {
		if err := wait(t, ch, "Settle"); err != nil {
			t.Errorf("Settle: %v", err)
		}
	}
	e.wantCounts(t, 2, map[string]pend{
		"a": {Dead: 1},
		"c": {Pending: 1, Dead: 1, OldestPending: now},
		"d": {Pending: 1, OldestPending: now},
	})
	l := e.takeDue(t, q, next)
	wantLease(t, l, *retry, event(2, now))
}
