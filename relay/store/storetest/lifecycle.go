package storetest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// testExpireKeys: ExpireKeys forgets the keys expired at its now and
// counts them; a renewed key and a stored event stay seen.
func testExpireKeys(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	expire := func(at time.Time) int {
		t.Helper()
		n, err := e.s.ExpireKeys(t.Context(), at)
		if err != nil {
			t.Fatalf("ExpireKeys: %v", err)
		}
		return n
	}
	wantSeen := func(at time.Time, want map[int]bool) {
		t.Helper()
		for n, w := range want {
			if seen, err := e.s.Seen(t.Context(), id(n), at); err != nil || seen != w {
				t.Errorf("Seen(%d) = %v, %v; want %v", n, seen, err, w)
			}
		}
	}
	if e.c.real {
		// The backend may expire keys itself and count none: what
		// matters is that they are gone.
		short, long := now.Add(e.keyTTL), now.Add(24*time.Hour)
		for n := 1; n <= 4; n++ {
			exp := short
			if n > 2 {
				exp = long
			}
			if e.acceptWith(t, event(n, now), nil, store.AcceptOptions{KeyExpiry: exp}) {
				t.Fatalf("Accept(%d): duplicate", n)
			}
		}
		e.after(t, short, "keys still seen after their expiry and ExpireKeys", func() bool {
			expire(e.c.Now())
			return !e.seen(t, id(1)) && !e.seen(t, id(2))
		})
		wantSeen(e.c.Now(), map[int]bool{3: true, 4: true})
		return
	}

	for n := 1; n <= 5; n++ {
		// Keys expire at now+1m .. now+5m.
		if e.acceptWith(t, event(n, now), nil, store.AcceptOptions{KeyExpiry: now.Add(time.Duration(n) * time.Minute)}) {
			t.Fatalf("Accept(%d): duplicate", n)
		}
	}
	// An event still stored whose key expires at now+2m.
	if e.acceptWith(t, event(6, now), []string{"a"}, store.AcceptOptions{KeyExpiry: now.Add(2 * time.Minute)}) {
		t.Fatal("Accept(6): duplicate")
	}
	// Re-accepting an expired key moves its expiry on.
	if e.acceptWith(t, event(1, now.Add(90*time.Second)), nil, store.AcceptOptions{KeyExpiry: now.Add(10 * time.Minute)}) {
		t.Fatal("Accept of an expired key: duplicate")
	}
	if n := expire(now.Add(3 * time.Minute)); n != 3 {
		t.Errorf("ExpireKeys(now+3m) = %d, want 3 (keys 2, 3 and 6; key 1 was renewed)", n)
	}
	if n := expire(now.Add(3 * time.Minute)); n != 0 {
		t.Errorf("second ExpireKeys(now+3m) = %d, want 0", n)
	}
	wantSeen(now.Add(3*time.Minute), map[int]bool{1: true, 2: false, 3: false, 4: true, 5: true, 6: true})
	if n := expire(now.Add(time.Hour)); n != 3 {
		t.Errorf("ExpireKeys(now+1h) = %d, want 3", n)
	}
	wantSeen(now.Add(time.Hour), map[int]bool{1: false, 4: false, 6: true})
	e.wantCounts(t, 1, map[string]pend{"a": {Pending: 1, OldestPending: now}})
}

// testClosed: once closed, every method returns ErrClosed, a waiting Take
// included, and Close may be called again.
func testClosed(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	e.accept(t, event(1, now), "a")
	q := e.queue(t, "a")
	l := e.take(t, q)
	ctx, cancel := context.WithTimeout(t.Context(), waitLong)
	defer cancel()
	waiting := make(chan error, 1)
	go func() {
		_, err := q.Take(ctx)
		waiting <- err
	}()
	e.none(t, q, "everything leased")

	if err := e.s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := e.s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	select {
	case err := <-waiting:
		if !errors.Is(err, store.ErrClosed) {
			t.Errorf("Take waiting at Close: %v, want ErrClosed", err)
		}
	case <-time.After(waitLong):
		t.Fatal("Take waiting at Close did not return")
	}

	bg := t.Context()
	checks := map[string]error{}
	_, checks["Accept"] = e.s.Accept(bg, event(2, now), []string{"a"}, dayKey(event(2, now)))
	_, checks["Seen"] = e.s.Seen(bg, id(1), now)
	_, checks["ExpireKeys"] = e.s.ExpireKeys(bg, now)
	_, checks["Queue"] = e.s.Queue("a", queueOpts)
	_, checks["Retire"] = e.s.Retire(bg, "a", "gone")
	_, checks["Take"] = q.Take(ctx)
	_, _, checks["DeadLetters"] = e.s.DeadLetters(bg, "", "", 10)
	_, checks["Replay"] = e.s.Replay(bg, nil, "", nil)
	_, checks["DeleteDead"] = e.s.DeleteDead(bg, id(1), "")
	_, _, checks["State"] = e.s.State(bg, "s", "k", now)
	_, checks["SetState"] = e.s.SetState(bg, "s", "k", []byte("v"), 0, now.Add(time.Hour))
	_, checks["Counts"] = e.s.Counts(bg)
	checks["Settle"] = wait(t, e.settleAsync(l, store.Delivered, e.attempt(l, 200, "", time.Time{})), "Settle after Close")
	for name, err := range checks {
		if !errors.Is(err, store.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
	// A lease abandoned at Close may be put back without harm.
	l.Postpone(now)
}

// testReopen: what was written survives a reopen: pending deliveries with
// their attempts and due times, dead letters, keys, states; a lease held
// at Close is taken again, and nothing is taken twice.
func testReopen(t *testing.T, h Harness) {
	if h.Reopen == nil {
		t.Skip("the backend keeps nothing across a reopen")
	}
	e := newEnv(t, h)
	now := e.c.Now()
	ev1, ev2, ev3 := event(1, now), event(2, now), event(3, now)
	e.accept(t, ev1, "a", "b")
	e.accept(t, ev2, "a")
	e.accept(t, ev3, "a")
	e.accept(t, event(4, now)) // a key only
	rev, err := e.s.SetState(t.Context(), "order", "k", []byte("kept"), 0, now.Add(24*time.Hour))
	if err != nil {
		t.Fatalf("SetState: %v", err)
	}
	// A shared store hands an abandoned lease out again once it lapses.
	opts := store.QueueOptions{Lease: time.Second}
	q, err := e.s.Queue("a", opts)
	if err != nil {
		t.Fatal(err)
	}
	leases := e.takeN(t, q, 3)
	retry := e.attempt(leases[id(1)], 503, "503 Service Unavailable", e.c.Now().Add(e.step))
	retry.Attempts = 7
	e.settle(t, leases[id(1)], store.Retry, retry)
	e.settle(t, leases[id(2)], store.Delivered, e.attempt(leases[id(2)], 200, "", time.Time{}))
	// leases[id(3)] is abandoned.
	lb := e.take(t, e.queue(t, "b"))
	dead := e.attempt(lb, 422, "422: nope", time.Time{})
	e.settle(t, lb, store.Dead, dead)
	counts := map[string]pend{"a": {Pending: 2, OldestPending: now}, "b": {Dead: 1}}
	e.wantCounts(t, 2, counts)

	e.reopen(t)
	e.wantCounts(t, 2, counts)
	e.wantDead(t, "", deadLetter(dead, ev1))
	for n := 1; n <= 4; n++ {
		if !e.acceptWith(t, event(n, e.c.Now()), []string{"a"}, dayKey(event(n, e.c.Now()))) {
			t.Errorf("Accept(%d) after reopen: new, want duplicate", n)
		}
	}
	if v, r, err := e.s.State(t.Context(), "order", "k", e.c.Now()); err != nil || string(v) != "kept" || r != rev {
		t.Errorf("State after reopen = %q, %d, %v; want %q, %d", v, r, err, "kept", rev)
	}

	q, err = e.s.Queue("a", opts)
	if err != nil {
		t.Fatal(err)
	}
	// The abandoned lease is due since its receipt, the retry at its time
	// (on the real clock, likely past by now).
	var again []store.Lease
	if e.c.real {
		for _, l := range e.takeN(t, q, 2) {
			again = append(again, l)
		}
	} else {
		again = append(again, e.take(t, q), e.takeDue(t, q, retry.NextAt))
	}
	for _, l := range again {
		switch l.Delivery().ID {
		case id(3):
			wantLease(t, l, fresh(ev3, "a"), ev3)
		case id(1):
			wantLease(t, l, *retry, ev1)
		default:
			t.Errorf("Take after reopen = %s, want 1 or 3", num(l.Delivery().ID))
		}
		e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
	}
	e.none(t, q, "everything delivered")
	counts = map[string]pend{"b": {Dead: 1}}
	e.wantCounts(t, 0, counts)

	// The outcomes settled after the reopen are durable too.
	e.reopen(t)
	e.wantCounts(t, 0, counts)
	e.none(t, e.queue(t, "a"), "everything delivered before the reopen")
	e.wantDead(t, "", deadLetter(dead, ev1))
}
