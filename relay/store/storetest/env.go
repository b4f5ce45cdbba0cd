package storetest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// t0 is where a fake clock starts: far from the wall clock, so that a
// store reading time.Now instead of its clock shows.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

const (
	// waitLong bounds every wait for something that should happen: long
	// enough for a loaded -race run, reached only when the store is wrong.
	waitLong = 10 * time.Second
	// pollEvery is how often a condition is polled on the real clock.
	pollEvery = 10 * time.Millisecond
	// early is how much sooner than due a real-clock backend may hand a
	// delivery out: timers of a server rounding its delays.
	early = 2 * time.Millisecond
)

// clock is the stores' clock: fake (moved by the suite) or the wall clock.
type clock struct {
	real bool
	// wake tells the store that a fake clock moved.
	wake func()

	mu  sync.Mutex
	now time.Time
}

// Now is the clock the store is given.
func (c *clock) Now() time.Time {
	if c.real {
		return time.Now()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// advanceTo moves a fake clock on to at and wakes the store's waiting
// Takes. The real clock moves by itself: callers then poll for what the
// time should bring.
func (c *clock) advanceTo(at time.Time) {
	if c.real {
		return
	}
	c.mu.Lock()
	if at.After(c.now) {
		c.now = at
	}
	c.mu.Unlock()
	if c.wake != nil {
		c.wake()
	}
}

// env is one contract test's store, clock and durations.
type env struct {
	h Harness
	c *clock
	s store.Store
	// step is a retry delay: a minute on a fake clock, tens of
	// milliseconds on the real one, where the test waits it out.
	step time.Duration
	// keyTTL is the life of a key or state the test outlives on purpose.
	keyTTL time.Duration
	// quiet is how long a Take must find nothing when nothing is due.
	quiet time.Duration

	mu sync.Mutex
	// closed are checks run once the store is closed for good: the
	// callbacks of Settle ran exactly once.
	closed   []func(t *testing.T)
	finished bool
}

// newEnv opens a store for one test and closes it at the test's end.
func newEnv(t *testing.T, h Harness) *env {
	t.Helper()
	e := &env{h: h, c: &clock{real: h.RealClock, now: t0}}
	if h.RealClock {
		e.step, e.keyTTL, e.quiet = 50*time.Millisecond, time.Second, 200*time.Millisecond
	} else {
		e.step, e.keyTTL, e.quiet = time.Minute, time.Hour, 30*time.Millisecond
	}
	if h.Wake != nil {
		e.c.wake = func() { h.Wake(e.s) }
	}
	e.s = h.Open(t, e.c.Now)
	t.Cleanup(func() { e.finish(t) })
	e.waitLoaded(t)
	return e
}

// finish closes the store for good and runs the checks waiting for it.
// It runs before the cleanups the harness registered when it opened the
// store (a server to shut down, say).
func (e *env) finish(t *testing.T) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.finished {
		return
	}
	e.finished = true
	if err := e.s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	for _, check := range e.closed {
		check(t)
	}
}

// reopen closes the store and opens its durable state again.
func (e *env) reopen(t *testing.T) {
	t.Helper()
	e.s = e.h.Reopen(t, e.s, e.c.Now)
	t.Cleanup(func() { e.finish(t) })
	e.waitLoaded(t)
}

// waitLoaded waits until a store that loads its queues in the background
// has loaded them.
func (e *env) waitLoaded(t *testing.T) {
	t.Helper()
	l, ok := e.s.(store.Loader)
	if !ok {
		return
	}
	select {
	case <-l.Loaded():
	case <-time.After(waitLong):
		t.Fatalf("Loaded not closed %s after opening", waitLong)
	}
}

func id(n int) store.ID {
	var i store.ID
	copy(i[:], fmt.Sprintf("event-%010d", n))
	return i
}

// num is the number id(n) was made of, for messages.
func num(i store.ID) string {
	if s, ok := strings.CutPrefix(string(i[:]), "event-"); ok {
		return strings.TrimLeft(s, "0")
	}
	return i.String()
}

func event(n int, at time.Time) *store.Event {
	return &store.Event{ID: id(n), ReceivedAt: at, ContentType: "application/json", Body: fmt.Appendf(nil, `{"n":%d}`, n)}
}

// dayKey keeps an event's key far past the test's end.
func dayKey(ev *store.Event) store.AcceptOptions {
	return store.AcceptOptions{KeyExpiry: ev.ReceivedAt.Add(24 * time.Hour)}
}

// acceptWith accepts ev and reports whether it was a duplicate.
func (e *env) acceptWith(t *testing.T, ev *store.Event, targets []string, opts store.AcceptOptions) bool {
	t.Helper()
	dup, err := e.s.Accept(t.Context(), ev, targets, opts)
	if err != nil {
		t.Fatalf("Accept(%s): %v", num(ev.ID), err)
	}
	return dup
}

// accept accepts a new event with a key kept for a day.
func (e *env) accept(t *testing.T, ev *store.Event, targets ...string) {
	t.Helper()
	if e.acceptWith(t, ev, targets, dayKey(ev)) {
		t.Fatalf("Accept(%s): duplicate, want new", num(ev.ID))
	}
}

// acceptNoKey accepts a new event without a key: Seen then tells whether
// the event itself is still stored.
func (e *env) acceptNoKey(t *testing.T, ev *store.Event, targets ...string) {
	t.Helper()
	if e.acceptWith(t, ev, targets, store.AcceptOptions{}) {
		t.Fatalf("Accept(%s): duplicate, want new", num(ev.ID))
	}
}

// acceptMany accepts events 1..n, received at at, from several
// goroutines: the writes a group commit joins.
func (e *env) acceptMany(t *testing.T, n int, at time.Time, targets ...string) {
	t.Helper()
	const writers = 16
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			for i := 1 + w; i <= n; i += writers {
				ev := event(i, at)
				dup, err := e.s.Accept(t.Context(), ev, targets, dayKey(ev))
				if err == nil && dup {
					err = errors.New("duplicate, want new")
				}
				if err != nil {
					errs <- fmt.Errorf("Accept(%d): %w", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func (e *env) seen(t *testing.T, i store.ID) bool {
	t.Helper()
	seen, err := e.s.Seen(t.Context(), i, e.c.Now())
	if err != nil {
		t.Fatalf("Seen(%s): %v", num(i), err)
	}
	return seen
}

// queueOpts leases for longer than any test runs: a shared store must not
// hand a held delivery to someone else meanwhile.
var queueOpts = store.QueueOptions{Lease: time.Minute}

func (e *env) queue(t *testing.T, target string) store.Queue {
	t.Helper()
	q, err := e.s.Queue(target, queueOpts)
	if err != nil {
		t.Fatalf("Queue(%s): %v", target, err)
	}
	return q
}

// take takes the next delivery, which must be due now or soon.
func (e *env) take(t *testing.T, q store.Queue) store.Lease {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), waitLong)
	defer cancel()
	l, err := q.Take(ctx)
	if err != nil {
		t.Fatalf("Take: %v", err)
	}
	return l
}

// none checks that q hands nothing out: nothing is due, or all of it is
// leased.
func (e *env) none(t *testing.T, q store.Queue, why string) {
	t.Helper()
	e.noneAll(t, why, q)
}

// noneAll checks that none of qs hands anything out, waiting on them at
// once.
func (e *env) noneAll(t *testing.T, why string, qs ...store.Queue) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), e.quiet)
	defer cancel()
	errs := make([]error, len(qs))
	var wg sync.WaitGroup
	for i, q := range qs {
		wg.Go(func() {
			l, err := q.Take(ctx)
			switch {
			case err == nil:
				d := l.Delivery()
				errs[i] = fmt.Errorf("take handed out %s at %s (%d attempts), want nothing", num(d.ID), d.Target, d.Attempts)
			case !errors.Is(err, context.DeadlineExceeded):
				errs[i] = fmt.Errorf("take: %w, want context.DeadlineExceeded", err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("%s: %v", why, err)
	}
}

// takeDue takes the delivery due at at, later than now, when q has
// nothing due before it: nothing is handed out before at, and it is after.
func (e *env) takeDue(t *testing.T, q store.Queue, at time.Time) store.Lease {
	t.Helper()
	if !e.c.real {
		e.none(t, q, "before it was due")
		e.c.advanceTo(at)
		return e.take(t, q)
	}
	l := e.take(t, q)
	if now := time.Now(); now.Before(at.Add(-early)) {
		d := l.Delivery()
		t.Errorf("Take handed %s at %s out %s before it was due", num(d.ID), d.Target, at.Sub(now))
	}
	return l
}

// takeN takes n deliveries from q, by event.
func (e *env) takeN(t *testing.T, q store.Queue, n int) map[store.ID]store.Lease {
	t.Helper()
	out := map[store.ID]store.Lease{}
	for range n {
		l := e.take(t, q)
		d := l.Delivery()
		if _, ok := out[d.ID]; ok {
			t.Fatalf("Take handed %s at %s out twice", num(d.ID), d.Target)
		}
		out[d.ID] = l
	}
	return out
}

// after checks that cond holds once the clock has reached at: a fake clock
// is moved there; on the real clock cond is polled until a deadline.
func (e *env) after(t *testing.T, at time.Time, what string, cond func() bool) {
	t.Helper()
	e.c.advanceTo(at)
	if !e.c.real {
		if !cond() {
			t.Error(what)
		}
		return
	}
	if err := poll(at.Add(waitLong), func() error {
		if !cond() {
			return errors.New(what)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}

// eventually calls fn until it succeeds, for what a shared store shows
// late (its counts); on other stores fn must succeed at once.
func (e *env) eventually(fn func() error) error {
	if !e.h.Shared {
		return fn()
	}
	return poll(time.Now().Add(waitLong), fn)
}

// poll calls fn until it succeeds or the deadline passes, and returns its
// last error.
func poll(deadline time.Time, fn func() error) error {
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for {
		err := fn()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		<-tick.C
	}
}

// attempt is l's delivery after one more attempt made now, which ended
// with status and msg and is due again at next.
func (e *env) attempt(l store.Lease, status int, msg string, next time.Time) *store.Delivery {
	d := l.Delivery()
	now := e.c.Now()
	d.Attempts++
	if d.FirstAttemptAt.IsZero() {
		d.FirstAttemptAt = now
	}
	d.LastAttemptAt = now
	d.LastStatus, d.LastError, d.NextAt = status, msg, next
	return &d
}

// settleAsync settles l and returns where the outcome's error arrives. It
// checks, once the store is closed, that then ran exactly once.
func (e *env) settleAsync(l store.Lease, o store.Outcome, d *store.Delivery) <-chan error {
	var calls atomic.Int32
	done := make(chan error, 1)
	what := fmt.Sprintf("Settle(%s) of %s at %s", o, num(d.ID), d.Target)
	e.mu.Lock()
	e.closed = append(e.closed, func(t *testing.T) {
		if n := calls.Load(); n != 1 {
			t.Errorf("%s: then called %d times, want once", what, n)
		}
	})
	e.mu.Unlock()
	l.Settle(o, d, func(err error) {
		if calls.Add(1) == 1 {
			done <- err
		}
	})
	return done
}

// wait waits for a settle's outcome.
func wait(t *testing.T, done <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(waitLong):
		t.Fatalf("%s: then not called within %s", what, waitLong)
		return nil
	}
}

// settle settles l and waits until the outcome is durable.
func (e *env) settle(t *testing.T, l store.Lease, o store.Outcome, d *store.Delivery) {
	t.Helper()
	what := fmt.Sprintf("Settle(%s) of %s at %s", o, num(d.ID), d.Target)
	if err := wait(t, e.settleAsync(l, o, d), what); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// deliver takes the next delivery at target and settles it delivered.
func (e *env) deliver(t *testing.T, q store.Queue) store.Delivery {
	t.Helper()
	l := e.take(t, q)
	e.settle(t, l, store.Delivered, e.attempt(l, 200, "", time.Time{}))
	return l.Delivery()
}

// pend is what a target's counts should be.
type pend = store.TargetCounts

// wantCounts checks the store's counts: at once, or on a shared store
// within its refresh interval.
func (e *env) wantCounts(t *testing.T, pendingEvents int, targets map[string]pend) {
	t.Helper()
	want := fmtCounts(store.Counts{PendingEvents: pendingEvents, Targets: targets})
	err := e.eventually(func() error {
		got, err := e.s.Counts(t.Context())
		if err != nil {
			return fmt.Errorf("counts: %w", err)
		}
		if g := fmtCounts(got); g != want {
			return fmt.Errorf("counts = %s\n                 want %s", g, want)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

func fmtCounts(c store.Counts) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d pending events", c.PendingEvents)
	for _, name := range slices.Sorted(maps.Keys(c.Targets)) {
		tc := c.Targets[name]
		fmt.Fprintf(&b, "; %s: %d pending, %d dead, oldest %s", name, tc.Pending, tc.Dead, fmtTime(tc.OldestPending))
	}
	return b.String()
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// diffDelivery says how got differs from want. A lease promises the
// delivery's identity, receipt, attempts and first attempt (all the
// engine reads of it); a dead letter (full) the last attempt's state too.
// NextAt is never compared: it means nothing for a dead letter, and a
// lease's due time shows in when it is handed out.
func diffDelivery(got, want store.Delivery, full bool) string {
	var diffs []string
	add := func(field string, g, w any) { diffs = append(diffs, fmt.Sprintf("%s %v, want %v", field, g, w)) }
	times := func(field string, g, w time.Time) {
		if !g.Equal(w) {
			add(field, fmtTime(g), fmtTime(w))
		}
	}
	if got.ID != want.ID {
		add("ID", num(got.ID), num(want.ID))
	}
	if got.Target != want.Target {
		add("Target", got.Target, want.Target)
	}
	times("ReceivedAt", got.ReceivedAt, want.ReceivedAt)
	if got.Attempts != want.Attempts {
		add("Attempts", got.Attempts, want.Attempts)
	}
	times("FirstAttemptAt", got.FirstAttemptAt, want.FirstAttemptAt)
	if !full {
		return strings.Join(diffs, "; ")
	}
	times("LastAttemptAt", got.LastAttemptAt, want.LastAttemptAt)
	if got.LastStatus != want.LastStatus {
		add("LastStatus", got.LastStatus, want.LastStatus)
	}
	if got.LastError != want.LastError {
		add("LastError", fmt.Sprintf("%q", got.LastError), fmt.Sprintf("%q", want.LastError))
	}
	return strings.Join(diffs, "; ")
}

// fresh is the delivery Accept makes of ev at target: due at its receipt.
func fresh(ev *store.Event, target string) store.Delivery {
	return store.Delivery{ID: ev.ID, Target: target, ReceivedAt: ev.ReceivedAt, NextAt: ev.ReceivedAt}
}

// wantLease checks a lease's delivery and event.
func wantLease(t *testing.T, l store.Lease, want store.Delivery, ev *store.Event) {
	t.Helper()
	if d := diffDelivery(l.Delivery(), want, false); d != "" {
		t.Errorf("Lease.Delivery of %s at %s: %s", num(want.ID), want.Target, d)
	}
	wantEvent(t, l.Event(), ev)
}

func wantEvent(t *testing.T, got, want *store.Event) {
	t.Helper()
	if got == nil {
		t.Errorf("Lease.Event of %s is nil", num(want.ID))
		return
	}
	if got.ID != want.ID || !got.ReceivedAt.Equal(want.ReceivedAt) || got.ContentType != want.ContentType || string(got.Body) != string(want.Body) {
		t.Errorf("Lease.Event = %s received %s, %q %q; want %s received %s, %q %q",
			num(got.ID), fmtTime(got.ReceivedAt), got.ContentType, got.Body,
			num(want.ID), fmtTime(want.ReceivedAt), want.ContentType, want.Body)
	}
}

// allDead lists target's dead letters (all targets for "") page by page.
func (e *env) allDead(t *testing.T, target string) []store.DeadLetter {
	t.Helper()
	var all []store.DeadLetter
	cursor := ""
	for range 1000 {
		list, next, err := e.s.DeadLetters(t.Context(), target, cursor, 2)
		if err != nil {
			t.Fatalf("DeadLetters(%q, %q): %v", target, cursor, err)
		}
		all = append(all, list...)
		if next == "" {
			return all
		}
		cursor = next
	}
	t.Fatalf("DeadLetters(%q): more than 1000 pages", target)
	return nil
}

// wantDead checks the dead letters at target (all for ""), in any order:
// their attempt state and their events.
func (e *env) wantDead(t *testing.T, target string, want ...store.DeadLetter) {
	t.Helper()
	got := e.allDead(t, target)
	key := func(d store.Delivery) string { return d.Target + "/" + num(d.ID) }
	byKey := map[string]store.DeadLetter{}
	for _, dl := range got {
		if _, ok := byKey[key(dl.Delivery)]; ok {
			t.Errorf("DeadLetters(%q) lists %s twice", target, key(dl.Delivery))
		}
		byKey[key(dl.Delivery)] = dl
	}
	for _, w := range want {
		g, ok := byKey[key(w.Delivery)]
		if !ok {
			t.Errorf("DeadLetters(%q): no %s", target, key(w.Delivery))
			continue
		}
		delete(byKey, key(w.Delivery))
		if d := diffDelivery(g.Delivery, w.Delivery, true); d != "" {
			t.Errorf("dead letter %s: %s", key(w.Delivery), d)
		}
		if g.ContentType != w.ContentType || string(g.Body) != string(w.Body) {
			t.Errorf("dead letter %s: event %q %q, want %q %q", key(w.Delivery), g.ContentType, g.Body, w.ContentType, w.Body)
		}
	}
	for k := range byKey {
		t.Errorf("DeadLetters(%q): unexpected %s", target, k)
	}
}

// deadLetter is what d of ev looks like as a dead letter.
func deadLetter(d *store.Delivery, ev *store.Event) store.DeadLetter {
	return store.DeadLetter{Delivery: *d, ContentType: ev.ContentType, Body: ev.Body}
}
