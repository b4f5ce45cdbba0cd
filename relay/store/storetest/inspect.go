package storetest

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// listPending lists target's pending deliveries (all targets for "") in
// pages of limit, checking that each page keeps to it and that the
// cursor moves on.
func (e *env) listPending(t *testing.T, target string, limit int) ([]store.Delivery, error) {
	t.Helper()
	most := limit
	if most <= 0 {
		most = 100
	}
	var all []store.Delivery
	cursor := ""
	for range 1000 {
		list, next, err := e.s.ListPending(t.Context(), target, cursor, limit)
		if err != nil {
			return nil, fmt.Errorf("ListPending(%q, %q, %d): %w", target, cursor, limit, err)
		}
		if len(list) > most {
			return nil, fmt.Errorf("ListPending(%q, %q, %d): page of %d", target, cursor, limit, len(list))
		}
		all = append(all, list...)
		if next == "" {
			return all, nil
		}
		if next == cursor || len(list) == 0 {
			return nil, fmt.Errorf("ListPending(%q, %q, %d): %d listed, next cursor %q: no progress", target, cursor, limit, len(list), next)
		}
		cursor = next
	}
	return nil, fmt.Errorf("ListPending(%q, limit %d): more than 1000 pages", target, limit)
}

func pairOf(d store.Delivery) string { return d.Target + "/" + num(d.ID) }

func pairs(list []store.Delivery) []string {
	out := make([]string, len(list))
	for i, d := range list {
		out[i] = pairOf(d)
	}
	return out
}

// diffPending is diffDelivery in full, with the next attempt and the
// order key: what a listing of pending deliveries shows.
func diffPending(got, want store.Delivery) string {
	diffs := []string{diffDelivery(got, want, true)}
	if !got.NextAt.Equal(want.NextAt) {
		diffs = append(diffs, fmt.Sprintf("NextAt %s, want %s", fmtTime(got.NextAt), fmtTime(want.NextAt)))
	}
	if got.OrderKey != want.OrderKey {
		diffs = append(diffs, fmt.Sprintf("OrderKey %q, want %q", got.OrderKey, want.OrderKey))
	}
	return strings.Join(slices.DeleteFunc(diffs, func(s string) bool { return s == "" }), "; ")
}

// matchPending says how got differs from want, both by (target, event)
// in any order.
func matchPending(what string, got, want []store.Delivery) error {
	byPair := map[string]store.Delivery{}
	var errs []error
	for _, d := range got {
		if _, ok := byPair[pairOf(d)]; ok {
			errs = append(errs, fmt.Errorf("%s lists %s twice", what, pairOf(d)))
		}
		byPair[pairOf(d)] = d
	}
	for _, w := range want {
		g, ok := byPair[pairOf(w)]
		if !ok {
			errs = append(errs, fmt.Errorf("%s: no %s", what, pairOf(w)))
			continue
		}
		delete(byPair, pairOf(w))
		if d := diffPending(g, w); d != "" {
			errs = append(errs, fmt.Errorf("%s: %s: %s", what, pairOf(w), d))
		}
	}
	for k := range byPair {
		errs = append(errs, fmt.Errorf("%s: unexpected %s", what, k))
	}
	return errors.Join(errs...)
}

// wantPending checks what ListPending shows at target (all for ""), in
// any order: at once, or on a shared store once it shows it.
func (e *env) wantPending(t *testing.T, target string, want ...store.Delivery) {
	t.Helper()
	err := e.eventually(func() error {
		got, err := e.listPending(t, target, 2)
		if err != nil {
			return err
		}
		return matchPending(fmt.Sprintf("ListPending(%q)", target), got, want)
	})
	if err != nil {
		t.Error(err)
	}
}

// wantLookup checks what Lookup shows of ev: its pending deliveries and
// dead letters, in any order.
func (e *env) wantLookup(t *testing.T, ev *store.Event, pending []store.Delivery, dead ...store.DeadLetter) {
	t.Helper()
	what := fmt.Sprintf("Lookup(%s)", num(ev.ID))
	err := e.eventually(func() error {
		st, err := e.s.Lookup(t.Context(), ev.ID)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		var errs []error
		if g := st.Event; g == nil {
			errs = append(errs, fmt.Errorf("%s: no event", what))
		} else if g.ID != ev.ID || !g.ReceivedAt.Equal(ev.ReceivedAt) || g.ContentType != ev.ContentType || string(g.Body) != string(ev.Body) {
			errs = append(errs, fmt.Errorf("%s: event %s received %s, %q %q; want received %s, %q %q", what,
				num(g.ID), fmtTime(g.ReceivedAt), g.ContentType, g.Body, fmtTime(ev.ReceivedAt), ev.ContentType, ev.Body))
		}
		errs = append(errs, matchPending(what+".Pending", st.Pending, pending))
		if len(st.Dead) != len(dead) {
			errs = append(errs, fmt.Errorf("%s: %d dead letters %v, want %d", what, len(st.Dead), st.Dead, len(dead)))
		}
		for _, w := range dead {
			i := slices.IndexFunc(st.Dead, func(g store.DeadLetter) bool { return g.Target == w.Target })
			if i < 0 {
				errs = append(errs, fmt.Errorf("%s: no dead letter at %s", what, w.Target))
				continue
			}
			g := st.Dead[i]
			if d := diffDelivery(g.Delivery, w.Delivery, true); d != "" {
				errs = append(errs, fmt.Errorf("%s: dead letter at %s: %s", what, w.Target, d))
			}
			if g.ContentType != w.ContentType || string(g.Body) != string(w.Body) {
				errs = append(errs, fmt.Errorf("%s: dead letter at %s: %q %q, want %q %q", what, w.Target, g.ContentType, g.Body, w.ContentType, w.Body))
			}
		}
		return errors.Join(errs...)
	})
	if err != nil {
		t.Error(err)
	}
}

// wantNoEvent checks that Lookup finds no event with i.
func (e *env) wantNoEvent(t *testing.T, i store.ID) {
	t.Helper()
	err := e.eventually(func() error {
		st, err := e.s.Lookup(t.Context(), i)
		if !errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("Lookup(%s) = %d pending, %d dead, %v; want ErrNotFound", num(i), len(st.Pending), len(st.Dead), err)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// testListPendingPaging: pages of every size list every pending delivery
// once, in one stable order, at one target or all: a leased one too,
// with its order key; a dead letter is no pending delivery.
func testListPendingPaging(t *testing.T, h Harness) {
	e := newEnv(t, h)
	base := e.c.Now().Add(-time.Minute)
	// Events 2 and 3 were received at the same instant; 4 has an order
	// key at a; 5's only delivery is dead.
	evs := []*store.Event{nil, event(1, base), event(2, base.Add(time.Second)), event(3, base.Add(time.Second)),
		event(4, base.Add(2*time.Second)), event(5, base.Add(3*time.Second))}
	e.accept(t, evs[1], "a")
	e.accept(t, evs[2], "a", "b")
	e.accept(t, evs[3], "b", "a")
	opts := dayKey(evs[4])
	opts.OrderKeys = []string{"key-4"}
	if e.acceptWith(t, evs[4], []string{"a"}, opts) {
		t.Fatal("Accept(4): duplicate, want new")
	}
	e.accept(t, evs[5], "c")
	e.killAll(t, "c", 1, 2)
	// A delivery leased now is still owed: held to the test's end.
	leased := e.take(t, e.queue(t, "b"))

	want := map[string]store.Delivery{}
	for _, p := range []struct {
		n      int
		target string
	}{{1, "a"}, {2, "a"}, {3, "a"}, {4, "a"}, {2, "b"}, {3, "b"}} {
		d := fresh(evs[p.n], p.target)
		if p.n == 4 {
			d.OrderKey = "key-4"
		}
		want[pairOf(d)] = d
	}
	if _, ok := want[pairOf(leased.Delivery())]; !ok {
		t.Fatalf("took %s, want a delivery at b", pairOf(leased.Delivery()))
	}
	wantAt := func(target string) []store.Delivery {
		var out []store.Delivery
		for _, d := range want {
			if target == "" || d.Target == target {
				out = append(out, d)
			}
		}
		return out
	}
	e.wantPending(t, "", wantAt("")...)

	for _, target := range []string{"", "a", "b", "c", "none"} {
		t.Run("target="+target, func(t *testing.T) {
			whole, err := e.listPending(t, target, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := matchPending(fmt.Sprintf("ListPending(%q)", target), whole, wantAt(target)); err != nil {
				t.Error(err)
			}
			order := pairs(whole)
			for limit := 1; limit <= len(want)+1; limit++ {
				paged, err := e.listPending(t, target, limit)
				if err != nil {
					t.Fatal(err)
				}
				if got := pairs(paged); !slices.Equal(got, order) {
					t.Errorf("pages of %d list %v, one page %v: the order is not stable", limit, got, order)
				}
			}
		})
	}
	t.Run("exact last page has no cursor", func(t *testing.T) {
		list, next, err := e.s.ListPending(t.Context(), "b", "", 2)
		if err != nil || len(list) != 2 || next != "" {
			t.Errorf("ListPending(b, limit 2) = %d, %q, %v; want 2 and no cursor", len(list), next, err)
		}
	})
	t.Run("bad cursor", func(t *testing.T) {
		if _, _, err := e.s.ListPending(t.Context(), "", "not a cursor", 2); err == nil {
			t.Error("ListPending with a cursor no store made: no error")
		}
	})
}

// testInspectAttempts: a retried delivery shows its attempts, last error
// and next attempt; a dead letter is in Lookup, not in ListPending; a
// delivered one is in neither; Lookup knows no event that is not stored.
func testInspectAttempts(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	ev := event(1, now)
	e.accept(t, ev, "a", "b")
	e.wantNoEvent(t, id(9))
	e.wantLookup(t, ev, []store.Delivery{fresh(ev, "a"), fresh(ev, "b")})

	qa := e.queue(t, "a")
	l := e.take(t, qa)
	retry := e.attempt(l, 503, "503 Service Unavailable", e.c.Now().Add(e.step))
	e.settle(t, l, store.Retry, retry)
	e.wantPending(t, "a", *retry)
	e.wantPending(t, "", *retry, fresh(ev, "b"))
	e.wantLookup(t, ev, []store.Delivery{*retry, fresh(ev, "b")})

	lb := e.take(t, e.queue(t, "b"))
	dead := e.attempt(lb, 422, "422 Unprocessable Entity", time.Time{})
	e.settle(t, lb, store.Dead, dead)
	e.wantPending(t, "b")
	e.wantPending(t, "", *retry)
	e.wantLookup(t, ev, []store.Delivery{*retry}, deadLetter(dead, ev))

	l = e.takeDue(t, qa, retry.NextAt)
	if d := l.Delivery(); d.Attempts != 1 {
		t.Errorf("retried delivery taken with %d attempts, want 1", d.Attempts)
	}
	e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
	e.wantPending(t, "")
	e.wantLookup(t, ev, nil, deadLetter(dead, ev))

	if n, err := e.s.DeleteDead(t.Context(), ev.ID, ""); err != nil || n != 1 {
		t.Fatalf("DeleteDead = %d, %v; want 1", n, err)
	}
	// Its key is still recorded; the event is not stored.
	e.wantNoEvent(t, ev.ID)

	ev2 := event(2, now)
	e.acceptNoKey(t, ev2, "a")
	e.wantLookup(t, ev2, []store.Delivery{fresh(ev2, "a")})
	e.deliver(t, qa)
	e.wantNoEvent(t, ev2.ID)
	e.wantPending(t, "")
}

// testInspectReopen: what ListPending and Lookup show survives a restart:
// attempts, order keys, leases abandoned, dead letters.
func testInspectReopen(t *testing.T, h Harness) {
	if h.Reopen == nil {
		t.Skip("the backend keeps nothing across a reopen")
	}
	e := newEnv(t, h)
	now := e.c.Now()
	ev1, ev2 := event(1, now.Add(-time.Second)), event(2, now)
	e.accept(t, ev1, "a", "b")
	opts := dayKey(ev2)
	opts.OrderKeys = []string{"key-2"}
	if e.acceptWith(t, ev2, []string{"a"}, opts) {
		t.Fatal("Accept(2): duplicate, want new")
	}
	leases := e.takeN(t, e.queue(t, "a"), 2)
	retry := e.attempt(leases[id(1)], 503, "503 Service Unavailable", e.c.Now().Add(e.step))
	e.settle(t, leases[id(1)], store.Retry, retry)
	// leases[id(2)] is abandoned.
	lb := e.take(t, e.queue(t, "b"))
	dead := e.attempt(lb, 422, "422: nope", time.Time{})
	e.settle(t, lb, store.Dead, dead)
	keyed := fresh(ev2, "a")
	keyed.OrderKey = "key-2"
	e.wantPending(t, "", *retry, keyed)

	e.reopen(t)
	e.wantPending(t, "", *retry, keyed)
	e.wantPending(t, "a", *retry, keyed)
	e.wantLookup(t, ev1, []store.Delivery{*retry}, deadLetter(dead, ev1))
	e.wantLookup(t, ev2, []store.Delivery{keyed})
	e.wantNoEvent(t, id(3))
}
