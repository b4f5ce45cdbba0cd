package storetest

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// testTakeSettle walks one event through its three outcomes: a retry due
// later, a dead letter with its attempt state, deliveries; the counts
// after each, and the event gone once nothing holds it.
func testTakeSettle(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	ev := event(1, now)
	e.acceptNoKey(t, ev, "a", "b", "c")
	all := map[string]pend{"a": {Pending: 1, OldestPending: now}, "b": {Pending: 1, OldestPending: now}, "c": {Pending: 1, OldestPending: now}}
	e.wantCounts(t, 1, all)

	qa := e.queue(t, "a")
	l := e.take(t, qa)
	wantLease(t, l, fresh(ev, "a"), ev)
	if err := l.Extend(t.Context()); err != nil {
		t.Errorf("Extend of a live lease: %v", err)
	}
	// A leased delivery is still pending.
	e.wantCounts(t, 1, all)

	retry := e.attempt(l, 503, "503 Service Unavailable", e.c.Now().Add(e.step))
	e.settle(t, l, store.Retry, retry)
	e.wantCounts(t, 1, all)
	l = e.takeDue(t, qa, retry.NextAt)
	wantLease(t, l, *retry, ev)

	dead := e.attempt(l, 400, "400 Bad Request: no", time.Time{})
	e.settle(t, l, store.Dead, dead)
	e.wantCounts(t, 1, map[string]pend{"a": {Dead: 1}, "b": {Pending: 1, OldestPending: now}, "c": {Pending: 1, OldestPending: now}})
	e.wantDead(t, "a", deadLetter(dead, ev))
	e.none(t, qa, "a dead letter")

	e.deliver(t, e.queue(t, "b"))
	e.wantCounts(t, 1, map[string]pend{"a": {Dead: 1}, "c": {Pending: 1, OldestPending: now}})
	e.deliver(t, e.queue(t, "c"))
	e.wantCounts(t, 0, map[string]pend{"a": {Dead: 1}})
	if !e.seen(t, id(1)) {
		t.Error("event held by a dead letter not stored")
	}
	e.wantDead(t, "", deadLetter(dead, ev))

	if n, err := e.s.DeleteDead(t.Context(), id(1), "a"); err != nil || n != 1 {
		t.Fatalf("DeleteDead = %d, %v; want 1", n, err)
	}
	if e.seen(t, id(1)) {
		t.Error("event still stored once nothing holds it")
	}
	e.wantCounts(t, 0, nil)
	e.wantDead(t, "")
}

// testPostpone: a delivery put back waits until it is due again, uses no
// attempt and changes nothing stored of it, and does not hold up others.
func testPostpone(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	ev := event(1, now)
	e.accept(t, ev, "a")
	q := e.queue(t, "a")
	l := e.take(t, q)
	l.Postpone(now)
	l = e.take(t, q)
	wantLease(t, l, fresh(ev, "a"), ev)

	retry := e.attempt(l, 429, "429 Too Many Requests", e.c.Now())
	e.settle(t, l, store.Retry, retry)
	l = e.take(t, q)
	wantLease(t, l, *retry, ev)

	// Long enough, on the real clock, for the next event to be accepted
	// and taken before it.
	at := e.c.Now().Add(10 * e.step)
	l.Postpone(at)
	next := event(2, e.c.Now())
	e.accept(t, next, "a")
	l2 := e.take(t, q)
	if l2.Delivery().ID != next.ID {
		t.Fatalf("Take = %s, want %s: a postponed delivery held up a due one", num(l2.Delivery().ID), num(next.ID))
	}
	e.wantCounts(t, 2, map[string]pend{"a": {Pending: 2, OldestPending: now}})
	e.settle(t, l2, store.Delivered, e.attempt(l2, 200, "", time.Time{}))
	e.wantCounts(t, 1, map[string]pend{"a": {Pending: 1, OldestPending: now}})

	l = e.takeDue(t, q, at)
	if d := diffDelivery(l.Delivery(), *retry, false); d != "" {
		t.Errorf("postponed delivery changed: %s", d)
	}
	e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
	e.wantCounts(t, 0, nil)
}

// testTakeOrder: deliveries due together are handed out older first, and
// OldestPending follows the oldest pending event at each target.
func testTakeOrder(t *testing.T, h Harness) {
	e := newEnv(t, h)
	base := e.c.Now()
	// On a fake clock the events are received out of the order they are
	// accepted in; on the real one receipt is acceptance.
	recv := map[int]time.Time{}
	for _, n := range []int{3, 1, 2} {
		at := e.c.Now()
		if !e.c.real {
			at = base.Add(-time.Duration(n) * time.Second)
		}
		recv[n] = at
		targets := []string{"a"}
		if n == 3 {
			targets = []string{"b", "a"}
		}
		e.accept(t, event(n, at), targets...)
	}
	order := []int{1, 2, 3}
	slices.SortFunc(order, func(x, y int) int { return recv[x].Compare(recv[y]) })

	// want checks the counts once the first k of order were delivered at a.
	want := func(k int) {
		t.Helper()
		targets := map[string]pend{"b": {Pending: 1, OldestPending: recv[3]}}
		if k < len(order) {
			targets["a"] = pend{Pending: len(order) - k, OldestPending: recv[order[k]]}
		}
		events := len(order) - k
		if slices.Index(order, 3) < k {
			events++ // still owed to b
		}
		e.wantCounts(t, events, targets)
	}
	want(0)

	q := e.queue(t, "a")
	take := func(why string) []store.Lease {
		t.Helper()
		var leases []store.Lease
		for i, n := range order {
			l := e.take(t, q)
			if got := l.Delivery().ID; got != id(n) {
				t.Errorf("%s: Take %d = event %s, want %s: older first", why, i+1, num(got), num(id(n)))
			}
			leases = append(leases, l)
		}
		return leases
	}
	leases := take("due at receipt")
	want(0)

	if !e.c.real {
		// Due together after retries settled newest first. (On the real
		// clock retries due together are not due at one instant.)
		next := e.c.Now().Add(e.step)
		for _, l := range slices.Backward(leases) {
			e.settle(t, l, store.Retry, e.attempt(l, 503, "503 Service Unavailable", next))
		}
		e.none(t, q, "retries due later")
		e.c.advanceTo(next)
		leases = take("retries due together")
	}

	// Delivered oldest first, whatever order they were taken in.
	byID := map[store.ID]store.Lease{}
	for _, l := range leases {
		byID[l.Delivery().ID] = l
	}
	for k, n := range order {
		l := byID[id(n)]
		if l == nil {
			t.Fatalf("event %d not taken", n)
		}
		e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
		want(k + 1)
	}
	l := e.take(t, e.queue(t, "b"))
	e.settle(t, l, store.Dead, e.attempt(l, 404, "404 Not Found", time.Time{}))
	e.wantCounts(t, 0, map[string]pend{"b": {Dead: 1}})
}

// testTakeConcurrentTakers: takers racing on one queue never get one
// delivery twice while it is leased.
func testTakeConcurrentTakers(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	const n, takers = 64, 4
	e.acceptMany(t, n, now, "a")

	ctx, cancel := context.WithTimeout(t.Context(), waitLong)
	defer cancel()
	var mu sync.Mutex
	var leases []store.Lease
	taken := map[store.ID]int{}
	var wg sync.WaitGroup
	errs := make(chan error, takers)
	for range takers {
		wg.Go(func() {
			q, err := e.s.Queue("a", queueOpts)
			if err != nil {
				errs <- err
				return
			}
			for {
				l, err := q.Take(ctx)
				if err != nil {
					if !errors.Is(err, context.Canceled) {
						errs <- err
					}
					return
				}
				mu.Lock()
				leases = append(leases, l)
				taken[l.Delivery().ID]++
				if len(leases) == n {
					cancel()
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("taker: %v", err)
	}
	for i, k := range taken {
		if k > 1 {
			t.Errorf("event %s taken %d times while leased", num(i), k)
		}
	}
	if len(taken) != n {
		t.Fatalf("%d of %d events taken", len(taken), n)
	}
	q := e.queue(t, "a")
	e.none(t, q, "everything leased")
	e.wantCounts(t, n, map[string]pend{"a": {Pending: n, OldestPending: now}})

	var done []<-chan error
	for _, l := range leases {
		done = append(done, e.settleAsync(l, store.Delivered, e.attempt(l, 200, "", time.Time{})))
	}
	for _, ch := range done {
		if err := wait(t, ch, "Settle(delivered)"); err != nil {
			t.Fatalf("Settle: %v", err)
		}
	}
	e.none(t, q, "everything delivered")
	e.wantCounts(t, 0, nil)
}

// testTakeWaitsForContext: with nothing due, Take waits until its context
// is done and returns the context's error.
func testTakeWaitsForContext(t *testing.T, h Harness) {
	e := newEnv(t, h)
	q := e.queue(t, "a")
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if l, err := q.Take(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Take on an empty queue = %v, %v; want context.DeadlineExceeded", l, err)
	}
	if ctx.Err() == nil {
		t.Error("Take returned before its context was done")
	}

	ctx, cancel = context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := q.Take(ctx)
		done <- err
	}()
	// Gives the Take time to wait, and checks the queue is still empty.
	e.none(t, q, "empty queue")
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("waiting Take after its context was cancelled: %v, want context.Canceled", err)
		}
	case <-time.After(waitLong):
		t.Fatal("waiting Take did not return once its context was cancelled")
	}
}

// testTakeWokenByAccept: a Take waiting on a retry due far off gets a
// fresh event at once.
func testTakeWokenByAccept(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	e.accept(t, event(1, now), "a")
	q := e.queue(t, "a")
	l := e.take(t, q)
	e.settle(t, l, store.Retry, e.attempt(l, 503, "503 Service Unavailable", now.Add(time.Hour)))

	type taken struct {
		l   store.Lease
		err error
		at  time.Time
	}
	got := make(chan taken, 1)
	ctx, cancel := context.WithTimeout(t.Context(), waitLong)
	defer cancel()
	go func() {
		l, err := q.Take(ctx)
		got <- taken{l, err, time.Now()}
	}()
	e.none(t, q, "only a retry an hour off")
	ev := event(2, e.c.Now())
	e.accept(t, ev, "a")
	accepted := time.Now()
	select {
	case r := <-got:
		if r.err != nil {
			t.Fatalf("waiting Take: %v", r.err)
		}
		if r.l.Delivery().ID != ev.ID {
			t.Fatalf("waiting Take = %s, want the fresh %s", num(r.l.Delivery().ID), num(ev.ID))
		}
		if late := r.at.Sub(accepted); late > time.Second {
			t.Errorf("waiting Take got the fresh event %s after it was accepted, want within a second", late)
		}
		e.settle(t, r.l, store.Delivered, e.attempt(r.l, 200, "", time.Time{}))
	case <-time.After(waitLong):
		t.Fatal("waiting Take not woken by a fresh event")
	}
	e.wantCounts(t, 1, map[string]pend{"a": {Pending: 1, OldestPending: now}})
}

// testTakeFreshPastRetries: thousands of deliveries waiting out a long
// retry never hold up a fresh event at their target (JetStream counts
// deliveries waiting out a NakWithDelay against MaxAckPending).
func testTakeFreshPastRetries(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	const n = 2000
	e.acceptMany(t, n, now, "a")
	q := e.queue(t, "a")
	far := now.Add(time.Hour)
	done := make([]<-chan error, 0, n)
	for range n {
		l := e.take(t, q)
		done = append(done, e.settleAsync(l, store.Retry, e.attempt(l, 503, "503 Service Unavailable", far)))
	}
	for _, ch := range done {
		if err := wait(t, ch, "Settle(retry)"); err != nil {
			t.Fatalf("Settle(retry): %v", err)
		}
	}
	e.wantCounts(t, n, map[string]pend{"a": {Pending: n, OldestPending: now}})

	ev := event(n+1, e.c.Now())
	e.accept(t, ev, "a")
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	l, err := q.Take(ctx)
	if err != nil {
		t.Fatalf("Take of a fresh event behind %d deliveries waiting out a retry: %v", n, err)
	}
	if l.Delivery().ID != ev.ID {
		t.Fatalf("Take = %s, want the fresh %s", num(l.Delivery().ID), num(ev.ID))
	}
	e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
	e.wantCounts(t, n, map[string]pend{"a": {Pending: n, OldestPending: now}})
}
