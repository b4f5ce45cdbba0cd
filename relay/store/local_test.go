package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeClock is a clock the tests move; stores' timers still run on real
// time, so a test that moves it wakes the store's takers.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock(t time.Time) *fakeClock { return &fakeClock{t: t} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

var testT0 = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

func testID(n int) ID {
	var i ID
	copy(i[:], fmt.Sprintf("event-%010d", n))
	return i
}

func testEvent(n int, at time.Time) *Event {
	return &Event{ID: testID(n), ReceivedAt: at, ContentType: "application/json", Body: fmt.Appendf(nil, `{"n":%d}`, n)}
}

func mustAccept(t testing.TB, s Store, ev *Event, targets ...string) {
	t.Helper()
	dup, err := s.Accept(context.Background(), ev, targets, AcceptOptions{KeyExpiry: ev.ReceivedAt.Add(time.Hour)})
	if err != nil || dup {
		t.Fatalf("Accept(%s) = %v, %v; want new", ev.ID, dup, err)
	}
}

func mustQueue(t testing.TB, s Store, target string) Queue {
	t.Helper()
	q, err := s.Queue(target, QueueOptions{Lease: time.Minute})
	if err != nil {
		t.Fatalf("Queue(%s): %v", target, err)
	}
	return q
}

// takeWithin takes from q, failing the test after d.
func takeWithin(t testing.TB, q Queue, d time.Duration) Lease {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	l, err := q.Take(ctx)
	if err != nil {
		t.Fatalf("Take: %v", err)
	}
	return l
}

// noTake checks that q hands nothing out for a short while: nothing due.
func noTake(t testing.TB, q Queue) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	l, err := q.Take(ctx)
	if err == nil {
		t.Fatalf("Take handed out %s, want nothing due", l.Delivery().ID)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Take: %v, want the context's deadline", err)
	}
}

// settleNow settles l and waits for the outcome to be durable.
func settleNow(t testing.TB, l Lease, o Outcome, d *Delivery) {
	t.Helper()
	done := make(chan error, 1)
	l.Settle(o, d, func(err error) { done <- err })
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Settle(%v): %v", o, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Settle(%v) never reported", o)
	}
}

// waitFor polls cond until it holds, failing the test after d.
func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func newTestQueue(now func() time.Time) *localQueue {
	return newLocalQueues(now, nil).get("t")
}

func (q *localQueue) waiting() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.waiters)
}

type taken struct {
	it  item
	err error
}

// taker takes from q in the background until ctx is done, sending what it
// gets to out.
func taker(ctx context.Context, wg *sync.WaitGroup, q *localQueue, out chan<- taken) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		it, _, _, err := q.take(ctx)
		out <- taken{it, err}
	}()
}

func TestLocalQueueDueOrder(t *testing.T) {
	clock := newFakeClock(testT0)
	q := newTestQueue(clock.Now)
	defer q.close()
	for _, n := range []int{3, 1, 2} {
		q.push(item{due: testT0.Add(time.Duration(n) * time.Second).UnixNano(), id: testID(n)})
	}
	// Due with event 3, received before it: handed out first of the two.
	q.push(item{due: testT0.Add(3 * time.Second).UnixNano(), recv: -1, id: testID(4)})
	q.push(item{due: testT0.Add(3 * time.Second).UnixNano(), recv: -2, id: testID(5)})
	q.push(item{due: testT0.Add(time.Hour).UnixNano(), id: testID(9)})
	clock.Set(testT0.Add(10 * time.Second))
	for i, want := range []int{1, 2, 5, 4, 3} {
		it, _, _, err := q.take(context.Background())
		if err != nil || it.id != testID(want) {
			t.Fatalf("take %d = %s, %v; want %s", i+1, it.id, err, testID(want))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if it, _, _, err := q.take(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("take handed out %s (%v) an hour early", it.id, err)
	}
	if n := q.count(); n != 6 {
		t.Errorf("count = %d, want 6: 5 leased, 1 queued", n)
	}
	// A taker waiting for the hour looks again when woken.
	var wg sync.WaitGroup
	out := make(chan taken, 1)
	taker(context.Background(), &wg, q, out)
	waitFor(t, "the taker to wait", 5*time.Second, func() bool { return q.waiting() == 1 })
	clock.Set(testT0.Add(time.Hour))
	q.wake()
	if got := <-out; got.err != nil || got.it.id != testID(9) {
		t.Errorf("take after the clock moved = %s, %v", got.it.id, got.err)
	}
	wg.Wait()
}

// TestLocalQueueTimer: an item due later is handed out when it falls due,
// by the queue's timer, on a clock in real time.
func TestLocalQueueTimer(t *testing.T) {
	q := newTestQueue(time.Now)
	defer q.close()
	start := time.Now()
	q.push(item{due: start.Add(30 * time.Millisecond).UnixNano(), id: testID(1)})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	it, _, _, err := q.take(ctx)
	if err != nil || it.id != testID(1) {
		t.Fatalf("take = %s, %v", it.id, err)
	}
	if took := time.Since(start); took < 30*time.Millisecond {
		t.Errorf("handed out after %s, before it was due", took)
	}
}

// TestLocalQueueOneWakePerItem: one item wakes one idle taker, not all.
func TestLocalQueueOneWakePerItem(t *testing.T) {
	clock := newFakeClock(testT0)
	q := newTestQueue(clock.Now)
	defer q.close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	out := make(chan taken, 3)
	for range 3 {
		taker(ctx, &wg, q, out)
	}
	waitFor(t, "3 takers waiting", 5*time.Second, func() bool { return q.waiting() == 3 })
	q.push(item{due: testT0.UnixNano(), id: testID(1)})
	if got := <-out; got.err != nil || got.it.id != testID(1) {
		t.Fatalf("take = %s, %v", got.it.id, got.err)
	}
	if n := q.waiting(); n != 2 {
		t.Errorf("%d takers waiting after one item, want the other 2", n)
	}
	if len(out) != 0 {
		t.Errorf("another taker returned: %+v", <-out)
	}
	// A batch wakes one, which passes the wake-up on while items are due.
	q.pushAll([]item{{due: testT0.UnixNano(), id: testID(2)}, {due: testT0.UnixNano(), id: testID(3)}}, nil)
	got := map[ID]bool{}
	for range 2 {
		r := <-out
		if r.err != nil {
			t.Fatal(r.err)
		}
		got[r.it.id] = true
	}
	if !got[testID(2)] || !got[testID(3)] {
		t.Errorf("the batch went to %v", got)
	}
	wg.Wait()
}

// TestLocalQueueTakerLeaving: a taker whose context ends leaves the
// waiters, so that the next item wakes a taker that is still there.
func TestLocalQueueTakerLeaving(t *testing.T) {
	clock := newFakeClock(testT0)
	q := newTestQueue(clock.Now)
	defer q.close()
	var wg sync.WaitGroup
	stay := make(chan taken, 1)
	taker(context.Background(), &wg, q, stay)
	waitFor(t, "the first taker to wait", 5*time.Second, func() bool { return q.waiting() == 1 })
	ctx, cancel := context.WithCancel(context.Background())
	leave := make(chan taken, 1)
	taker(ctx, &wg, q, leave)
	waitFor(t, "the second taker to wait", 5*time.Second, func() bool { return q.waiting() == 2 })
	cancel()
	if got := <-leave; !errors.Is(got.err, context.Canceled) {
		t.Fatalf("cancelled take = %v, want context.Canceled", got.err)
	}
	q.push(item{due: testT0.UnixNano(), id: testID(1)})
	select {
	case got := <-stay:
		if got.err != nil || got.it.id != testID(1) {
			t.Errorf("take = %s, %v", got.it.id, got.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the item's wake-up went to the taker that left")
	}
	wg.Wait()
}

// TestLocalQueueRetire: retiring wakes the takers with ErrClosed; the
// queue, emptied, opens again on a new epoch, and what a lease or the
// backlog load of the old epoch brings back is dropped.
func TestLocalQueueRetire(t *testing.T) {
	clock := newFakeClock(testT0)
	q := newTestQueue(clock.Now)
	defer q.close()
	q.pushLoaded([]item{{due: testT0.UnixNano(), id: testID(1)}, {due: testT0.UnixNano(), id: testID(2)}}, nil)
	old, _, oldEpoch, err := q.take(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := q.take(context.Background()); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	out := make(chan taken, 2)
	q.push(item{due: testT0.Add(time.Hour).UnixNano(), id: testID(3)})
	for range 2 {
		taker(context.Background(), &wg, q, out)
	}
	waitFor(t, "2 takers waiting", 5*time.Second, func() bool { return q.waiting() == 2 })
	q.retire()
	for range 2 {
		if got := <-out; !errors.Is(got.err, ErrClosed) {
			t.Errorf("take after retire = %+v, want ErrClosed", got)
		}
	}
	wg.Wait()
	if _, _, _, err := q.take(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("take on a retired queue: %v, want ErrClosed", err)
	}
	if n := q.count(); n != 3 {
		t.Errorf("count before clear = %d, want 3 (still pending until the write)", n)
	}
	q.clear()
	q.pushLoaded([]item{{due: testT0.UnixNano(), id: testID(4)}}, nil) // the snapshot's, stale now
	q.putBack(old, oldEpoch)                                           // a lease of the old epoch
	q.release(old, oldEpoch)                                           // the other
	if n := q.count(); n != 0 {
		t.Errorf("count after clear and stale pushes = %d, want 0", n)
	}
	q.reopen()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if it, _, _, err := q.take(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("take on the reopened queue = %s, %v; want nothing", it.id, err)
	}
	q.push(item{due: testT0.UnixNano(), id: testID(5)})
	if it, _, epoch, err := q.take(context.Background()); err != nil || it.id != testID(5) || epoch == oldEpoch {
		t.Errorf("take after reopen = %s, epoch %d, %v", it.id, epoch, err)
	}
}

// TestPostpone: a postponed delivery comes back at the time given, with
// nothing of it changed, and counts as pending all the while.
func TestPostpone(t *testing.T) {
	for _, open := range localStores {
		t.Run(open.name, func(t *testing.T) {
			clock := newFakeClock(testT0)
			s := open.open(t, clock.Now)
			mustAccept(t, s, testEvent(1, testT0), "a")
			q := mustQueue(t, s, "a")
			l := takeWithin(t, q, 5*time.Second)
			retry := l.Delivery()
			retry.Attempts, retry.FirstAttemptAt, retry.NextAt = 1, testT0, testT0.Add(time.Minute)
			settleNow(t, l, Retry, &retry)
			clock.Set(testT0.Add(time.Minute))
			wake(s)
			l = takeWithin(t, q, 5*time.Second)
			l.Postpone(testT0.Add(time.Hour))
			checkPending(t, s, "a", 1)
			noTake(t, q)
			clock.Set(testT0.Add(time.Hour))
			wake(s)
			l = takeWithin(t, q, 5*time.Second)
			if d := l.Delivery(); d.Attempts != 1 || !d.FirstAttemptAt.Equal(testT0) || !d.NextAt.Equal(testT0.Add(time.Hour)) {
				t.Errorf("postponed delivery = %+v, want 1 attempt made, first at t0, due at t0+1h", d)
			}
			// Postponing again, or after settling, does nothing.
			settleNow(t, l, Delivered, &Delivery{})
			l.Postpone(testT0)
			checkPending(t, s, "a", 0)
			noTake(t, q)
		})
	}
}

// TestSettleFailedKeepsLease: a settle that fails leaves the lease held,
// to be postponed.
func TestSettleFailedKeepsLease(t *testing.T) {
	for _, open := range localStores {
		t.Run(open.name, func(t *testing.T) {
			clock := newFakeClock(testT0)
			s := open.open(t, clock.Now)
			mustAccept(t, s, testEvent(1, testT0), "a")
			l := takeWithin(t, mustQueue(t, s, "a"), 5*time.Second)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			l.Settle(Delivered, &Delivery{}, func(err error) { done <- err })
			if err := <-done; !errors.Is(err, ErrClosed) {
				t.Fatalf("Settle after Close: %v, want ErrClosed", err)
			}
			ll := l.(*localLease)
			ll.q.mu.Lock()
			state, leased := ll.state, ll.q.leased
			ll.q.mu.Unlock()
			if state != leaseHeld || leased != 1 {
				t.Errorf("after a failed settle: state %d, %d leased; want held, 1", state, leased)
			}
			l.Postpone(testT0)
			if n := ll.q.count(); n != 1 {
				t.Errorf("count after postponing = %d, want 1", n)
			}
		})
	}
}

// localStores open the stores of one process on a clock.
var localStores = []struct {
	name string
	open func(t testing.TB, now func() time.Time) Store
}{
	{"memory", func(t testing.TB, now func() time.Time) Store {
		s := NewMemory(MemoryOptions{Now: now})
		t.Cleanup(func() { s.Close() })
		return s
	}},
	{"bolt", func(t testing.TB, now func() time.Time) Store {
		t.Helper()
		return openTestBolt(t, t.TempDir()+"/relay.db", now)
	}},
}

func wake(s Store) { s.(interface{ Wake() }).Wake() }

func checkPending(t testing.TB, s Store, target string, want int) {
	t.Helper()
	c, err := s.Counts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Targets[target].Pending; got != want {
		t.Errorf("Counts: %d pending at %s, want %d", got, target, want)
	}
}

func TestUniqueTargets(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"", ""}, {"a", "a"}, {"a b", "a b"}, {"a b a", "a b"}, {"a a a", "a"},
	} {
		if got := strings.Join(uniqueTargets(strings.Fields(tt.in)), " "); got != tt.want {
			t.Errorf("uniqueTargets(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestParseID(t *testing.T) {
	for _, tt := range []struct {
		in string
		ok bool
	}{
		{testID(1).String(), true},
		{strings.ToUpper(testID(1).String()), true},
		{"abc", false},
		{strings.Repeat("z", 32), false},
		{testID(1).String() + "00", false},
	} {
		got, err := ParseID(tt.in)
		if (err == nil) != tt.ok || (tt.ok && got != testID(1)) {
			t.Errorf("ParseID(%q) = %s, %v; want ok %v", tt.in, got, err, tt.ok)
		}
	}
}

func BenchmarkMemoryAcceptParallel(b *testing.B) {
	s := NewMemory(MemoryOptions{})
	defer s.Close()
	benchmarkAcceptParallel(b, s)
}
