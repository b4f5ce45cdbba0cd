package store

import (
	"bytes"
	"container/heap"
	"context"
	"errors"
	"slices"
	"sync"
	"time"
)

// item is a pending delivery in a local store's queue: small, since a
// restart may load a million of them. What it lacks (the last attempt's
// status and error) is on disk, and rewritten by every settle anyway.
type item struct {
	due      int64 // unix ns
	recv     int64
	first    int64
	attempts int32
	id       ID
}

func itemOf(d *Delivery) item {
	it := item{recv: d.ReceivedAt.UnixNano(), attempts: int32(d.Attempts), id: d.ID}
	if !d.NextAt.IsZero() {
		it.due = d.NextAt.UnixNano()
	}
	if !d.FirstAttemptAt.IsZero() {
		it.first = d.FirstAttemptAt.UnixNano()
	}
	return it
}

func (it item) delivery(target string) Delivery {
	d := Delivery{
		ID: it.id, Target: target, ReceivedAt: time.Unix(0, it.recv),
		Attempts: int(it.attempts), NextAt: time.Unix(0, it.due),
	}
	if it.first != 0 {
		d.FirstAttemptAt = time.Unix(0, it.first)
	}
	return d
}

// itemHeap orders items by due time, and those due together older event
// first.
type itemHeap []item

func (h itemHeap) Len() int { return len(h) }
func (h itemHeap) Less(i, j int) bool {
	if h[i].due != h[j].due {
		return h[i].due < h[j].due
	}
	if h[i].recv != h[j].recv {
		return h[i].recv < h[j].recv
	}
	return bytes.Compare(h[i].id[:], h[j].id[:]) < 0
}
func (h itemHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *itemHeap) Push(x any)   { *h = append(*h, x.(item)) }
func (h *itemHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	return it
}

// localQueues are the per-target schedules of a store of one process
// (Bolt, Memory): the store owns what is pending, these say what is due
// when. Every delivery pending in the store is in its target's queue or
// leased from it, exactly once.
type localQueues struct {
	now    func() time.Time
	mu     sync.Mutex
	closed bool
	m      map[string]*localQueue
}

func newLocalQueues(now func() time.Time) *localQueues {
	return &localQueues{now: now, m: map[string]*localQueue{}}
}

// get returns target's queue, making it on first use: deliveries are
// queued whether or not anybody asked for the queue.
func (qs *localQueues) get(target string) *localQueue {
	qs.mu.Lock()
	defer qs.mu.Unlock()
	q := qs.m[target]
	if q == nil {
		q = &localQueue{target: target, now: qs.now, closed: qs.closed}
		qs.m[target] = q
	}
	return q
}

// close makes every Take, waiting or to come, return ErrClosed.
func (qs *localQueues) close() {
	qs.mu.Lock()
	defer qs.mu.Unlock()
	qs.closed = true
	for _, q := range qs.m {
		q.close()
	}
}

// wake makes every waiting Take look at the clock again.
func (qs *localQueues) wake() {
	qs.mu.Lock()
	defer qs.mu.Unlock()
	for _, q := range qs.m {
		q.wake()
	}
}

// pending returns the deliveries queued or leased, per target that has
// any.
func (qs *localQueues) pending() map[string]int {
	qs.mu.Lock()
	defer qs.mu.Unlock()
	out := map[string]int{}
	for t, q := range qs.m {
		if n := q.count(); n > 0 {
			out[t] = n
		}
	}
	return out
}

// localQueue is one target's deliveries ordered by due time. Idle takers
// wait each on its own channel, and one item wakes one taker (a broadcast
// would wake every idle worker on every ack). One timer, armed for the
// earliest item not yet due, wakes a taker when it falls due.
type localQueue struct {
	target string
	now    func() time.Time

	mu      sync.Mutex
	h       itemHeap
	waiters []chan struct{}
	timer   *time.Timer
	timerAt int64 // unix ns the timer is armed for; 0 when not armed
	leased  int   // taken and not yet settled or put back
	// epoch counts the times the queue was emptied by a retirement: a
	// lease or a backlog item from before one no longer stands for a
	// pending delivery.
	epoch   uint64
	retired bool
	closed  bool
}

// count is the target's pending deliveries: queued or leased.
func (q *localQueue) count() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.h) + q.leased
}

func (q *localQueue) push(it item) {
	q.mu.Lock()
	heap.Push(&q.h, it)
	q.wakeOneLocked()
	q.mu.Unlock()
}

// pushAll queues a batch of items.
func (q *localQueue) pushAll(items []item) {
	q.mu.Lock()
	q.pushAllLocked(items)
	q.mu.Unlock()
}

func (q *localQueue) pushAllLocked(items []item) {
	if len(items) == 0 {
		return
	}
	if len(items) >= len(q.h) {
		q.h = append(q.h, items...)
		heap.Init(&q.h)
	} else {
		for _, it := range items {
			heap.Push(&q.h, it)
		}
	}
	// One wake-up: the taker passes it on while more are due.
	q.wakeOneLocked()
}

// pushLoaded queues items of a snapshot taken when the store opened,
// unless the queue was emptied since (the target retired: those
// deliveries are dead letters now, and a replay queues them afresh).
func (q *localQueue) pushLoaded(items []item) {
	q.mu.Lock()
	if q.epoch == 0 {
		q.pushAllLocked(items)
	}
	q.mu.Unlock()
}

func (q *localQueue) wakeOneLocked() {
	if n := len(q.waiters); n > 0 {
		close(q.waiters[n-1])
		q.waiters = q.waiters[:n-1]
	}
}

func (q *localQueue) wakeAllLocked() {
	for _, w := range q.waiters {
		close(w)
	}
	q.waiters = q.waiters[:0]
}

func (q *localQueue) wake() {
	q.mu.Lock()
	q.wakeAllLocked()
	q.mu.Unlock()
}

// retire stops the queue handing out items, and wakes its takers to say
// so. What it holds stays until clear: the deliveries are still pending
// until the retirement's write commits.
func (q *localQueue) retire() {
	q.mu.Lock()
	q.retired = true
	q.wakeAllLocked()
	q.mu.Unlock()
}

// clear empties the queue once its deliveries are no longer pending, and
// starts a new epoch: leases held from the old one settle without
// touching it.
func (q *localQueue) clear() {
	q.mu.Lock()
	q.h = nil
	q.leased = 0
	q.epoch++
	q.stopTimerLocked()
	q.mu.Unlock()
}

// reopen lets a retired queue hand out items again.
func (q *localQueue) reopen() {
	q.mu.Lock()
	q.retired = false
	q.mu.Unlock()
}

func (q *localQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.stopTimerLocked()
	q.wakeAllLocked()
	q.mu.Unlock()
}

func (q *localQueue) stopTimerLocked() {
	if q.timer != nil {
		q.timer.Stop()
	}
	q.timerAt = 0
}

// armLocked makes the timer fire at due, unless it fires earlier already.
func (q *localQueue) armLocked(due, now int64) {
	if q.timerAt != 0 && q.timerAt <= due {
		return
	}
	d := time.Duration(due - now)
	q.timerAt = due
	if q.timer == nil {
		q.timer = time.AfterFunc(d, q.fire)
		return
	}
	q.timer.Reset(d)
}

func (q *localQueue) fire() {
	q.mu.Lock()
	q.timerAt = 0
	q.wakeOneLocked()
	q.mu.Unlock()
}

// take waits for the earliest item to be due and leases it: it counts as
// pending, leased, until release or putBack. It returns the epoch the
// lease belongs to.
func (q *localQueue) take(ctx context.Context) (item, uint64, error) {
	for {
		if err := ctx.Err(); err != nil {
			return item{}, 0, err
		}
		q.mu.Lock()
		if q.closed || q.retired {
			q.mu.Unlock()
			return item{}, 0, ErrClosed
		}
		n := q.now().UnixNano()
		if len(q.h) > 0 && q.h[0].due <= n {
			it := heap.Pop(&q.h).(item)
			q.leased++
			if len(q.h) > 0 && q.h[0].due <= n {
				q.wakeOneLocked() // more are due: let another idle taker have one
			}
			epoch := q.epoch
			q.mu.Unlock()
			return it, epoch, nil
		}
		if len(q.h) > 0 {
			q.armLocked(q.h[0].due, n)
		}
		w := make(chan struct{})
		q.waiters = append(q.waiters, w)
		q.mu.Unlock()
		select {
		case <-w:
		case <-ctx.Done():
			q.leave(w)
			return item{}, 0, ctx.Err()
		}
	}
}

// leave takes a taker that gives up off the waiters, passing on a
// wake-up it got meanwhile: it may have been for an item.
func (q *localQueue) leave(w chan struct{}) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, x := range q.waiters {
		if x == w {
			q.waiters = append(q.waiters[:i], q.waiters[i+1:]...)
			return
		}
	}
	q.wakeOneLocked()
}

// release ends a lease whose delivery is no longer pending.
func (q *localQueue) release(epoch uint64) {
	q.mu.Lock()
	if epoch == q.epoch {
		q.leased--
	}
	q.mu.Unlock()
}

// putBack ends a lease whose delivery is still pending, due at it.due.
func (q *localQueue) putBack(it item, epoch uint64) {
	q.mu.Lock()
	if epoch == q.epoch {
		q.leased--
		heap.Push(&q.h, it)
		q.wakeOneLocked()
	}
	q.mu.Unlock()
}

// Lease states.
const (
	leaseHeld = iota
	leaseSettling
	leaseDone
)

var errSettling = errors.New("lease is being settled")

// localLease is a lease of a local store: held until settled or
// postponed, never lapsing.
type localLease struct {
	q     *localQueue
	it    item
	epoch uint64
	ev    *Event
	st    leaseSettler
	state int // guarded by q.mu
}

// leaseSettler records a lease's outcome in its store; it calls
// l.settled once the outcome is durable, before then.
type leaseSettler interface {
	settleLease(l *localLease, o Outcome, d *Delivery, then func(error))
}

func (l *localLease) Delivery() Delivery { return l.it.delivery(l.q.target) }

func (l *localLease) Event() *Event { return l.ev }

// Extend implements Lease: a local lease never lapses.
func (l *localLease) Extend(context.Context) error { return nil }

// Settle implements Lease. A lease is settled once; settling it again
// does nothing.
func (l *localLease) Settle(o Outcome, d *Delivery, then func(error)) {
	if then == nil {
		then = func(error) {}
	}
	l.q.mu.Lock()
	state := l.state
	if state == leaseHeld {
		l.state = leaseSettling
	}
	l.q.mu.Unlock()
	switch state {
	case leaseSettling:
		then(errSettling)
		return
	case leaseDone:
		then(nil)
		return
	}
	// The delivery is the lease's, whatever d says of its identity.
	c := *d
	c.ID, c.Target, c.ReceivedAt = l.it.id, l.q.target, time.Unix(0, l.it.recv)
	l.st.settleLease(l, o, &c, then)
}

// settled applies a durable outcome to the queue: a retry is queued
// again (if the delivery was still pending), anything else ends the
// lease. On err the lease is held again, for the caller to postpone.
func (l *localLease) settled(o Outcome, d *Delivery, stillPending bool, err error) {
	q := l.q
	q.mu.Lock()
	defer q.mu.Unlock()
	if err != nil {
		l.state = leaseHeld
		return
	}
	l.state = leaseDone
	if l.epoch != q.epoch {
		return
	}
	q.leased--
	if o == Retry && stillPending {
		it := itemOf(d)
		heap.Push(&q.h, it)
		q.wakeOneLocked()
	}
}

// Postpone implements Lease.
func (l *localLease) Postpone(at time.Time) {
	q := l.q
	q.mu.Lock()
	defer q.mu.Unlock()
	if l.state != leaseHeld {
		return
	}
	l.state = leaseDone
	if l.epoch != q.epoch {
		return
	}
	q.leased--
	it := l.it
	it.due = at.UnixNano()
	heap.Push(&q.h, it)
	q.wakeOneLocked()
}

// localTaker is what Queues.Queue returns: a target's queue, taken from
// by its store, which reads the event to go with the item.
type localTaker struct {
	q    *localQueue
	take func(ctx context.Context, q *localQueue) (Lease, error)
}

// Take implements Queue.
func (t localTaker) Take(ctx context.Context) (Lease, error) { return t.take(ctx, t.q) }

// uniqueTargets drops repeated names: an event is owed once per target.
func uniqueTargets(targets []string) []string {
	for i := 1; i < len(targets); i++ {
		for j := range i {
			if targets[i] == targets[j] {
				out := make([]string, 0, len(targets))
				for _, t := range targets {
					if !slices.Contains(out, t) {
						out = append(out, t)
					}
				}
				return out
			}
		}
	}
	return targets
}
