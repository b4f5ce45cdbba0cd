package store

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"sync"
	"time"
)

// MemoryOptions configure a Memory store.
type MemoryOptions struct {
	// Now is the clock deliveries fall due by and key states expire by;
	// nil is time.Now.
	Now func() time.Time
}

// Memory is a Store that keeps everything in memory: fast, and lost with
// the process. For set-ups that accept that trade.
type Memory struct {
	now func() time.Time
	qs  *localQueues

	mu            sync.Mutex
	closed        bool
	events        map[ID]*memEvent
	keys          map[ID]time.Time
	pending       map[string]map[ID]*Delivery
	dead          map[string]map[ID]*Delivery
	states        map[string]*memState
	rev           uint64 // the last revision given to a key state
	seq           uint64 // the last place in queue order given to a keyed delivery
	pendingEvents int
}

type memEvent struct {
	ev         Event
	owed, dead int
}

type memState struct {
	value  []byte
	rev    uint64
	expiry time.Time // zero: never
}

// NewMemory returns an empty in-memory store.
func NewMemory(opts MemoryOptions) *Memory {
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	s := &Memory{
		now:     now,
		events:  map[ID]*memEvent{},
		keys:    map[ID]time.Time{},
		pending: map[string]map[ID]*Delivery{},
		dead:    map[string]map[ID]*Delivery{},
		states:  map[string]*memState{},
	}
	s.qs = newLocalQueues(now, s)
	return s
}

func (s *Memory) lock() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	return nil
}

// Close implements Store.
func (s *Memory) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.qs.close()
	return nil
}

// Wake makes every waiting Take look at the clock again: for a clock
// that moves other than in real time.
func (s *Memory) Wake() { s.qs.wake() }

func (s *Memory) seen(id ID, now time.Time) bool {
	if exp, ok := s.keys[id]; ok && exp.After(now) {
		return true
	}
	_, ok := s.events[id]
	return ok
}

// Accept implements Intake.
func (s *Memory) Accept(_ context.Context, ev *Event, targets []string, opts AcceptOptions) (bool, error) {
	targets, keys, err := targetKeys(targets, opts.OrderKeys)
	if err != nil {
		return false, fmt.Errorf("accepting event %s: %w", ev.ID, err)
	}
	if err := s.lock(); err != nil {
		return false, err
	}
	defer s.mu.Unlock()
	if s.seen(ev.ID, ev.ReceivedAt) {
		return true, nil
	}
	if len(targets) > 0 && opts.MaxPending > 0 && s.pendingEvents >= opts.MaxPending {
		return false, ErrFull
	}
	if !opts.KeyExpiry.IsZero() {
		s.keys[ev.ID] = opts.KeyExpiry
	}
	if len(targets) == 0 {
		return false, nil
	}
	e := &memEvent{ev: *ev, owed: len(targets)}
	e.ev.Body = bytes.Clone(ev.Body)
	s.events[ev.ID] = e
	s.pendingEvents++
	if keys != nil {
		s.seq++
	}
	for i, t := range targets {
		m := s.pending[t]
		if m == nil {
			m = map[ID]*Delivery{}
			s.pending[t] = m
		}
		d := &Delivery{ID: ev.ID, Target: t, ReceivedAt: ev.ReceivedAt, NextAt: ev.ReceivedAt}
		if keys != nil {
			d.OrderKey = keys[i]
		}
		m[ev.ID] = d
		if d.OrderKey == "" {
			s.qs.get(t).push(itemOf(d))
		} else {
			s.qs.get(t).pushKeyed(keyedItem{it: itemOf(d), key: d.OrderKey, seq: s.seq})
		}
	}
	return false, nil
}

// Seen implements Intake.
func (s *Memory) Seen(_ context.Context, id ID, now time.Time) (bool, error) {
	if err := s.lock(); err != nil {
		return false, err
	}
	defer s.mu.Unlock()
	return s.seen(id, now), nil
}

// ExpireKeys implements Intake.
func (s *Memory) ExpireKeys(_ context.Context, now time.Time) (int, error) {
	if err := s.lock(); err != nil {
		return 0, err
	}
	defer s.mu.Unlock()
	n := 0
	for id, exp := range s.keys {
		if !exp.After(now) {
			delete(s.keys, id)
			n++
		}
	}
	for k, st := range s.states {
		if st.expired(now) {
			delete(s.states, k)
		}
	}
	return n, nil
}

// Queue implements Queues.
func (s *Memory) Queue(target string, opts QueueOptions) (Queue, error) {
	if err := s.lock(); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	q := s.qs.get(target)
	q.setOrdered(opts.Ordered)
	q.reopen()
	return localTaker{q: q, take: s.take}, nil
}

func (s *Memory) take(ctx context.Context, q *localQueue) (Lease, error) {
	for {
		it, key, epoch, err := q.take(ctx)
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, ErrClosed
		}
		e := s.events[it.id]
		_, pending := s.pending[q.target][it.id]
		if e == nil || !pending {
			s.mu.Unlock()
			q.release(it, epoch)
			continue
		}
		ev := e.ev
		ev.Body = bytes.Clone(ev.Body)
		s.mu.Unlock()
		return &localLease{q: q, it: it, key: key, epoch: epoch, ev: &ev}, nil
	}
}

func (s *Memory) release(id ID, e *memEvent) {
	if e.owed == 0 && e.dead == 0 {
		delete(s.events, id)
	}
}

// settleLease records an outcome at once: there is nothing to wait for.
func (s *Memory) settleLease(l *localLease, o Outcome, d *Delivery, then func(error)) {
	if err := s.lock(); err != nil {
		l.settled(o, d, false, err)
		then(err)
		return
	}
	pending := s.settle(d, o)
	// Under the lock, so that a retirement cannot come between the write
	// and the queue.
	l.settled(o, d, pending, nil)
	s.mu.Unlock()
	then(nil)
}

// settle applies an outcome and reports whether the delivery is still
// pending.
func (s *Memory) settle(d *Delivery, o Outcome) bool {
	e, ok := s.events[d.ID]
	if !ok {
		return false
	}
	p := s.pending[d.Target][d.ID]
	dl := s.dead[d.Target][d.ID]
	owed := e.owed
	switch o {
	case Retry:
		if p != nil {
			c := *d
			s.pending[d.Target][d.ID] = &c
		}
		return p != nil
	case Dead:
		if p == nil {
			return false
		}
		delete(s.pending[d.Target], d.ID)
		if s.dead[d.Target] == nil {
			s.dead[d.Target] = map[ID]*Delivery{}
		}
		c := *d
		s.dead[d.Target][d.ID] = &c
		e.owed--
		e.dead++
	case Delivered:
		if p != nil {
			delete(s.pending[d.Target], d.ID)
			e.owed--
		}
		if dl != nil {
			delete(s.dead[d.Target], d.ID)
			e.dead--
		}
	}
	if owed > 0 && e.owed == 0 {
		s.pendingEvents--
	}
	s.release(d.ID, e)
	return false
}

// Retire implements Queues: the target's pending deliveries become dead
// letters.
func (s *Memory) Retire(_ context.Context, target, reason string) (int, error) {
	if err := s.lock(); err != nil {
		return 0, err
	}
	defer s.mu.Unlock()
	q := s.qs.get(target)
	q.retire()
	now := s.now()
	n := 0
	for id, d := range s.pending[target] {
		d.LastError = reason
		if d.LastAttemptAt.IsZero() {
			d.LastAttemptAt = now
		}
		if s.dead[target] == nil {
			s.dead[target] = map[ID]*Delivery{}
		}
		s.dead[target][id] = d
		if e := s.events[id]; e != nil {
			e.owed--
			e.dead++
			if e.owed == 0 {
				s.pendingEvents--
			}
		}
		n++
	}
	delete(s.pending, target)
	q.clear()
	return n, nil
}

// sortedKeys gives the listings a stable order.
func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func sortedDeliveries(m map[ID]*Delivery) []*Delivery {
	out := make([]*Delivery, 0, len(m))
	for _, d := range m {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool {
		return bytes.Compare(makeRef(out[i].ReceivedAt, out[i].ID), makeRef(out[j].ReceivedAt, out[j].ID)) < 0
	})
	return out
}

// DeadLetters implements DeadLetters.
func (s *Memory) DeadLetters(_ context.Context, target, cursor string, limit int) ([]DeadLetter, string, error) {
	limit = ListLimit(limit)
	if err := s.lock(); err != nil {
		return nil, "", err
	}
	defer s.mu.Unlock()
	var list []DeadLetter
	next, err := pageMemory(s.dead, target, cursor, limit, func(d *Delivery) {
		dl := DeadLetter{Delivery: *d}
		if e := s.events[d.ID]; e != nil {
			dl.ContentType = e.ev.ContentType
			dl.Body = bytes.Clone(e.ev.Body)
		}
		list = append(list, dl)
	})
	return list, next, err
}

// pageMemory walks byTarget (pending or dead), one target's or every
// target's in name order, each in ref order, from after cursor, giving
// add up to limit deliveries; it returns the next page's cursor, as
// Bolt's pageDeliveries does for the file.
func pageMemory(byTarget map[string]map[ID]*Delivery, target, cursor string, limit int, add func(*Delivery)) (string, error) {
	var fromTarget string
	var fromRef []byte
	if cursor != "" {
		var err error
		if fromTarget, fromRef, err = decodeCursor(cursor); err != nil {
			return "", err
		}
	}
	names := sortedKeys(byTarget)
	if target != "" {
		names = []string{target}
	}
	n := 0
	var last *Delivery
	for _, t := range names {
		if t < fromTarget {
			continue
		}
		for _, d := range sortedDeliveries(byTarget[t]) {
			if t == fromTarget && fromRef != nil && bytes.Compare(makeRef(d.ReceivedAt, d.ID), fromRef) <= 0 {
				continue
			}
			if n == limit {
				return encodeCursor(last.Target, makeRef(last.ReceivedAt, last.ID)), nil
			}
			add(d)
			n++
			last = d
		}
	}
	return "", nil
}

// Replay implements DeadLetters.
func (s *Memory) Replay(_ context.Context, ids []ID, target string, keep func(string) bool) (int, error) {
	if err := s.lock(); err != nil {
		return 0, err
	}
	defer s.mu.Unlock()
	now := s.now()
	moved := 0
	for _, t := range sortedKeys(s.dead) {
		if (target != "" && t != target) || (keep != nil && !keep(t)) {
			continue
		}
		// In receipt order, as listed: the order those of one key go in.
		var move []*Delivery
		if len(ids) == 0 {
			move = sortedDeliveries(s.dead[t])
		} else {
			m := map[ID]*Delivery{}
			for _, id := range ids {
				if d := s.dead[t][id]; d != nil {
					m[id] = d
				}
			}
			move = sortedDeliveries(m)
		}
		if len(move) == 0 {
			continue
		}
		if s.pending[t] == nil {
			s.pending[t] = map[ID]*Delivery{}
		}
		var items []item
		var keyed []keyedItem
		for _, d := range move {
			delete(s.dead[t], d.ID)
			nd := &Delivery{ID: d.ID, Target: t, ReceivedAt: d.ReceivedAt, NextAt: now, OrderKey: d.OrderKey}
			s.pending[t][d.ID] = nd
			if e := s.events[d.ID]; e != nil {
				if e.owed == 0 {
					s.pendingEvents++
				}
				e.owed++
				e.dead--
			}
			if nd.OrderKey == "" {
				items = append(items, itemOf(nd))
			} else {
				// Behind what is pending for its key.
				s.seq++
				keyed = append(keyed, keyedItem{it: itemOf(nd), key: nd.OrderKey, seq: s.seq})
			}
			moved++
		}
		s.qs.get(t).pushAll(items, keyed)
	}
	return moved, nil
}

// DeleteDead implements DeadLetters.
func (s *Memory) DeleteDead(_ context.Context, id ID, target string) (int, error) {
	if err := s.lock(); err != nil {
		return 0, err
	}
	defer s.mu.Unlock()
	n := 0
	e := s.events[id]
	for t, m := range s.dead {
		if target != "" && t != target {
			continue
		}
		if _, ok := m[id]; ok {
			delete(m, id)
			n++
			if e != nil {
				e.dead--
			}
		}
	}
	if e != nil {
		s.release(id, e)
	}
	return n, nil
}

func (st *memState) expired(now time.Time) bool {
	return !st.expiry.IsZero() && !st.expiry.After(now)
}

// State implements KeyStates.
func (s *Memory) State(_ context.Context, space, key string, now time.Time) ([]byte, uint64, error) {
	k, err := stateKey(space, key)
	if err != nil {
		return nil, 0, err
	}
	if err := s.lock(); err != nil {
		return nil, 0, err
	}
	defer s.mu.Unlock()
	st := s.states[string(k)]
	if st == nil || st.expired(now) {
		return nil, 0, ErrNotFound
	}
	return bytes.Clone(st.value), st.rev, nil
}

// SetState implements KeyStates. Revisions come from one counter, so that
// a record written anew after another expired never has a revision the
// old one had.
func (s *Memory) SetState(_ context.Context, space, key string, value []byte, rev uint64, expiry time.Time) (uint64, error) {
	k, err := stateKey(space, key)
	if err != nil {
		return 0, err
	}
	if err := s.lock(); err != nil {
		return 0, err
	}
	defer s.mu.Unlock()
	var cur uint64
	if st := s.states[string(k)]; st != nil && !st.expired(s.now()) {
		cur = st.rev
	}
	if cur != rev {
		return 0, ErrConflict
	}
	s.rev++
	s.states[string(k)] = &memState{value: bytes.Clone(value), rev: s.rev, expiry: expiry}
	return s.rev, nil
}

// Counts implements Counter.
func (s *Memory) Counts(context.Context) (Counts, error) {
	if err := s.lock(); err != nil {
		return Counts{}, err
	}
	defer s.mu.Unlock()
	c := Counts{PendingEvents: s.pendingEvents, Targets: map[string]TargetCounts{}}
	for t, m := range s.pending {
		if len(m) == 0 {
			continue
		}
		tc := TargetCounts{Pending: len(m)}
		for _, d := range m {
			if tc.OldestPending.IsZero() || d.ReceivedAt.Before(tc.OldestPending) {
				tc.OldestPending = d.ReceivedAt
			}
		}
		c.Targets[t] = tc
	}
	for t, m := range s.dead {
		if len(m) == 0 {
			continue
		}
		tc := c.Targets[t]
		tc.Dead = len(m)
		c.Targets[t] = tc
	}
	return c, nil
}

// ListPending implements Inspector: target by target, oldest event
// first, paged with the cursors of DeadLetters.
func (s *Memory) ListPending(_ context.Context, target, cursor string, limit int) ([]Delivery, string, error) {
	limit = ListLimit(limit)
	if err := s.lock(); err != nil {
		return nil, "", err
	}
	defer s.mu.Unlock()
	var list []Delivery
	next, err := pageMemory(s.pending, target, cursor, limit, func(d *Delivery) { list = append(list, *d) })
	return list, next, err
}

// Lookup implements Inspector.
func (s *Memory) Lookup(_ context.Context, id ID) (EventState, error) {
	if err := s.lock(); err != nil {
		return EventState{}, err
	}
	defer s.mu.Unlock()
	e := s.events[id]
	if e == nil {
		return EventState{}, fmt.Errorf("looking up event %s: %w", id, ErrNotFound)
	}
	ev := e.ev
	ev.Body = bytes.Clone(e.ev.Body)
	st := EventState{Event: &ev}
	for _, t := range sortedKeys(s.pending) {
		if d := s.pending[t][id]; d != nil {
			st.Pending = append(st.Pending, *d)
		}
	}
	for _, t := range sortedKeys(s.dead) {
		if d := s.dead[t][id]; d != nil {
			st.Dead = append(st.Dead, DeadLetter{Delivery: *d, ContentType: ev.ContentType, Body: bytes.Clone(ev.Body)})
		}
	}
	return st, nil
}

// Pending calls fn for every pending delivery, target by target, oldest
// event first: for tests that look at what the relay left.
func (s *Memory) Pending(fn func(d *Delivery) error) error {
	if err := s.lock(); err != nil {
		return err
	}
	var all []Delivery
	for _, t := range sortedKeys(s.pending) {
		for _, d := range sortedDeliveries(s.pending[t]) {
			all = append(all, *d)
		}
	}
	s.mu.Unlock()
	for i := range all {
		if err := fn(&all[i]); err != nil {
			return err
		}
	}
	return nil
}

var _ Store = (*Memory)(nil)
