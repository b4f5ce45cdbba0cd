package store

import (
	"bytes"
	"cmp"
	"container/heap"
	"context"
	"errors"
	"fmt"
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
	// key is the item's order key as an index into its queue's lines, 0
	// for none. A number rather than the string: it fits where attempts
	// leaves padding, and keeps items free of pointers, so that neither
	// the size of a million of them nor the collector's work grows.
	key uint32
	id  ID
}

// keyedItem is an item with an order key, as a store hands it to its
// queue: the key and the delivery's place in queue order.
type keyedItem struct {
	it  item
	key string
	seq uint64
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
	st     leaseSettler
	mu     sync.Mutex
	closed bool
	// loading: the store is still queueing its backlog; queues made
	// meanwhile start out loading.
	loading bool
	m       map[string]*localQueue
}

func newLocalQueues(now func() time.Time, st leaseSettler) *localQueues {
	return &localQueues{now: now, st: st, m: map[string]*localQueue{}}
}

// get returns target's queue, making it on first use: deliveries are
// queued whether or not anybody asked for the queue.
func (qs *localQueues) get(target string) *localQueue {
	qs.mu.Lock()
	defer qs.mu.Unlock()
	q := qs.m[target]
	if q == nil {
		q = &localQueue{target: target, now: qs.now, st: qs.st, closed: qs.closed, loading: qs.loading}
		qs.m[target] = q
	}
	return q
}

// loaded says that the backlog is queued, every target's.
func (qs *localQueues) loaded() {
	qs.mu.Lock()
	defer qs.mu.Unlock()
	qs.loading = false
	for _, q := range qs.m {
		q.loaded()
	}
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
//
// Items with an order key are also in their key's line, in queue order.
// When the queue is ordered only a line's head (its earliest pending
// delivery) may be in the heap as live; the others wait parked in the
// line, or sit in the heap stale (they were there when ordering began)
// and are parked when they come up. Items without a key never touch a
// line.
type localQueue struct {
	target string
	now    func() time.Time
	// st records the outcomes of the queue's leases: here, not in each
	// lease, which then stays in a smaller size class.
	st leaseSettler

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

	ordered bool
	// loading: the store's backlog for the target is not all queued
	// yet, so a line's head may not be its earliest delivery: an ordered
	// queue hands out none of its keyed items until it is.
	loading bool
	lines   []*keyLine // by item.key; lines[0] and freed ones are nil
	lineOf  map[string]uint32
	free    []uint32
	parked  int // items waiting in lines, in no heap
}

// keyLine is one order key's pending deliveries at a target, in queue
// order.
type keyLine struct {
	name    string
	members []member // by seq
	seqOf   map[ID]uint64
}

// member is a pending delivery in its key's line.
type member struct {
	seq uint64
	// it is the item while parked; otherwise the heap or the lease holds
	// it, and only its id is read here.
	it item
	at place
}

// place is where a keyed item is.
type place uint8

const (
	// live: in the heap, handed out when due.
	live place = iota
	// stale: in the heap, but an earlier delivery of its key is pending:
	// parked when it comes up.
	stale
	parked
	leased
)

// count is the target's pending deliveries: queued or leased.
func (q *localQueue) count() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.h) + q.parked + q.leased
}

func (q *localQueue) push(it item) {
	q.mu.Lock()
	heap.Push(&q.h, it)
	q.wakeOneLocked()
	q.mu.Unlock()
}

func (q *localQueue) pushKeyed(ki keyedItem) {
	q.mu.Lock()
	q.addKeyedLocked(ki)
	q.mu.Unlock()
}

// pushAll queues a batch of items.
func (q *localQueue) pushAll(items []item, keyed []keyedItem) {
	q.mu.Lock()
	q.pushAllLocked(items)
	for _, ki := range keyed {
		q.addKeyedLocked(ki)
	}
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
func (q *localQueue) pushLoaded(items []item, keyed []keyedItem) {
	q.mu.Lock()
	if q.epoch == 0 {
		q.pushAllLocked(items)
		for _, ki := range keyed {
			q.addKeyedLocked(ki)
		}
	}
	q.mu.Unlock()
}

// loaded says that the target's backlog is all queued: its lines are
// whole, and an ordered queue may hand out their heads.
func (q *localQueue) loaded() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.loading {
		return
	}
	q.loading = false
	for _, l := range q.lines {
		if l != nil {
			q.promoteLocked(l)
		}
	}
}

// setOrdered switches ordering on or off, for what is queued too.
func (q *localQueue) setOrdered(on bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.ordered == on {
		return
	}
	q.ordered = on
	for _, l := range q.lines {
		if l == nil {
			continue
		}
		for i := range l.members {
			m := &l.members[i]
			switch {
			case on && m.at == live:
				m.at = stale // the head is made live again below
			case !on && m.at == stale:
				m.at = live
				q.wakeOneLocked()
			case !on && m.at == parked:
				m.at = live
				q.parked--
				heap.Push(&q.h, m.it)
				q.wakeOneLocked()
			}
		}
		q.promoteLocked(l)
	}
}

// addKeyedLocked queues an item with an order key in its line: live at
// once unless ordering holds it back.
func (q *localQueue) addKeyedLocked(ki keyedItem) {
	k := q.lineLocked(ki.key)
	l := q.lines[k]
	it := ki.it
	it.key = k
	// Nearly always at the end: new deliveries come last in queue order,
	// and a backlog loads in receipt order, close to it.
	i, _ := slices.BinarySearchFunc(l.members, ki.seq, func(m member, seq uint64) int { return cmp.Compare(m.seq, seq) })
	l.members = slices.Insert(l.members, i, member{seq: ki.seq, it: it, at: parked})
	l.seqOf[it.id] = ki.seq
	if !q.ordered {
		l.members[i].at = live
		heap.Push(&q.h, it)
		q.wakeOneLocked()
		return
	}
	q.parked++
	if i == 0 && len(l.members) > 1 && l.members[1].at == live {
		l.members[1].at = stale // no longer the head
	}
	q.promoteLocked(l)
}

// lineLocked returns the index of key's line, making it if need be.
func (q *localQueue) lineLocked(key string) uint32 {
	if k, ok := q.lineOf[key]; ok {
		return k
	}
	l := &keyLine{name: key, seqOf: map[ID]uint64{}}
	if q.lineOf == nil {
		q.lineOf = map[string]uint32{}
		q.lines = []*keyLine{nil}
	}
	var k uint32
	if n := len(q.free); n > 0 {
		k = q.free[n-1]
		q.free = q.free[:n-1]
		q.lines[k] = l
	} else {
		k = uint32(len(q.lines))
		q.lines = append(q.lines, l)
	}
	q.lineOf[key] = k
	return k
}

// promoteLocked makes a line's head live when the queue is ordered.
func (q *localQueue) promoteLocked(l *keyLine) {
	if !q.ordered || q.loading || len(l.members) == 0 {
		return
	}
	m := &l.members[0]
	switch m.at {
	case parked:
		m.at = live
		q.parked--
		heap.Push(&q.h, m.it)
		q.wakeOneLocked()
	case stale:
		m.at = live
		q.wakeOneLocked()
	}
}

// find returns the index of id in l, or -1.
func (l *keyLine) find(id ID) int {
	if len(l.members) > 0 && l.members[0].it.id == id {
		return 0
	}
	seq, ok := l.seqOf[id]
	if !ok {
		return -1
	}
	i, found := slices.BinarySearchFunc(l.members, seq, func(m member, seq uint64) int { return cmp.Compare(m.seq, seq) })
	if !found {
		return -1
	}
	return i
}

// claimLocked leases a keyed item that came up in the heap and returns
// its key, or parks it and returns false when it is stale.
func (q *localQueue) claimLocked(it item) (string, bool) {
	l := q.lines[it.key]
	if l == nil {
		return "", true
	}
	i := l.find(it.id)
	if i < 0 {
		return l.name, true // not in its line: nothing to keep in order
	}
	m := &l.members[i]
	if m.at == stale {
		m.it, m.at = it, parked
		q.parked++
		return "", false
	}
	m.at = leased
	return l.name, true
}

// endLocked ends a lease of it: requeue puts it back, due at it.due;
// otherwise its delivery is no longer pending, and the next of its key
// may become due.
func (q *localQueue) endLocked(it item, requeue bool) {
	q.leased--
	if it.key == 0 {
		if requeue {
			heap.Push(&q.h, it)
			q.wakeOneLocked()
		}
		return
	}
	l := q.lines[it.key]
	i := -1
	if l != nil {
		i = l.find(it.id)
	}
	if i < 0 {
		if requeue {
			heap.Push(&q.h, it)
			q.wakeOneLocked()
		}
		return
	}
	if requeue {
		m := &l.members[i]
		m.it = it
		if !q.ordered || (i == 0 && !q.loading) {
			m.at = live
			heap.Push(&q.h, it)
			q.wakeOneLocked()
		} else {
			m.at = parked
			q.parked++
		}
		return
	}
	delete(l.seqOf, it.id)
	if i == 0 {
		l.members = l.members[1:]
	} else {
		l.members = slices.Delete(l.members, i, i+1)
	}
	if len(l.members) == 0 {
		delete(q.lineOf, l.name)
		q.lines[it.key] = nil
		q.free = append(q.free, it.key)
		return
	}
	if i == 0 {
		q.promoteLocked(l)
	}
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
	q.lines, q.lineOf, q.free, q.parked = nil, nil, nil, 0
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
// pending, leased, until release or putBack. It returns the item's order
// key and the epoch the lease belongs to.
func (q *localQueue) take(ctx context.Context) (item, string, uint64, error) {
	for {
		if err := ctx.Err(); err != nil {
			return item{}, "", 0, err
		}
		q.mu.Lock()
		if q.closed || q.retired {
			q.mu.Unlock()
			return item{}, "", 0, ErrClosed
		}
		n := q.now().UnixNano()
		for len(q.h) > 0 && q.h[0].due <= n {
			it := heap.Pop(&q.h).(item)
			var key string
			if it.key != 0 {
				var ok bool
				if key, ok = q.claimLocked(it); !ok {
					continue
				}
			}
			q.leased++
			if len(q.h) > 0 && q.h[0].due <= n {
				q.wakeOneLocked() // more are due: let another idle taker have one
			}
			epoch := q.epoch
			q.mu.Unlock()
			return it, key, epoch, nil
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
			return item{}, "", 0, ctx.Err()
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

// release ends a lease of it whose delivery is no longer pending.
func (q *localQueue) release(it item, epoch uint64) {
	q.mu.Lock()
	if epoch == q.epoch {
		q.endLocked(it, false)
	}
	q.mu.Unlock()
}

// putBack ends a lease whose delivery is still pending, due at it.due.
func (q *localQueue) putBack(it item, epoch uint64) {
	q.mu.Lock()
	if epoch == q.epoch {
		q.endLocked(it, true)
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
	key   string // the order key
	epoch uint64
	ev    *Event
	state int // guarded by q.mu
}

// leaseSettler records a lease's outcome in its store; it calls
// l.settled once the outcome is durable, before then.
type leaseSettler interface {
	settleLease(l *localLease, o Outcome, d *Delivery, then func(error))
}

func (l *localLease) Delivery() Delivery {
	d := l.it.delivery(l.q.target)
	d.OrderKey = l.key
	return d
}

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
	c.ID, c.Target, c.ReceivedAt, c.OrderKey = l.it.id, l.q.target, time.Unix(0, l.it.recv), l.key
	l.q.st.settleLease(l, o, &c, then)
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
	if o == Retry && stillPending {
		it := itemOf(d)
		it.key = l.it.key
		q.endLocked(it, true)
		return
	}
	q.endLocked(l.it, false)
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
	it := l.it
	it.due = at.UnixNano()
	q.endLocked(it, true)
}

// localTaker is what Queues.Queue returns: a target's queue, taken from
// by its store, which reads the event to go with the item.
type localTaker struct {
	q    *localQueue
	take func(ctx context.Context, q *localQueue) (Lease, error)
}

// Take implements Queue.
func (t localTaker) Take(ctx context.Context) (Lease, error) { return t.take(ctx, t.q) }

// targetKeys checks an Accept's order keys against its targets and drops
// repeated targets from both (the first one stands); keys is nil when no
// target has one.
func targetKeys(targets, keys []string) ([]string, []string, error) {
	if keys == nil {
		return uniqueTargets(targets), nil, nil
	}
	if len(keys) != len(targets) {
		return nil, nil, fmt.Errorf("%d order keys for %d targets", len(keys), len(targets))
	}
	if !slices.ContainsFunc(keys, func(k string) bool { return k != "" }) {
		return uniqueTargets(targets), nil, nil
	}
	var outT, outK []string
	for i, t := range targets {
		if !slices.Contains(outT, t) {
			outT = append(outT, t)
			outK = append(outK, keys[i])
		}
	}
	return outT, outK, nil
}

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
