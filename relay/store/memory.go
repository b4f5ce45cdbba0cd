package store

import (
	"bytes"
	"sort"
	"sync"
	"time"
)

// Memory is a Store that keeps everything in memory: fast, and lost with
// the process. For set-ups that accept that trade.
type Memory struct {
	mu      sync.Mutex
	closed  bool
	events  map[ID]*memEvent
	keys    map[ID]time.Time
	pending map[string]map[ID]*Delivery
	dead    map[string]map[ID]*Delivery
}

type memEvent struct {
	ev         Event
	owed, dead int
}

// NewMemory returns an empty in-memory store.
func NewMemory() *Memory {
	return &Memory{
		events:  map[ID]*memEvent{},
		keys:    map[ID]time.Time{},
		pending: map[string]map[ID]*Delivery{},
		dead:    map[string]map[ID]*Delivery{},
	}
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
	return nil
}

func (s *Memory) seen(id ID, now time.Time) bool {
	if exp, ok := s.keys[id]; ok && exp.After(now) {
		return true
	}
	_, ok := s.events[id]
	return ok
}

// Accept implements Store.
func (s *Memory) Accept(ev *Event, targets []string, keyExpiry, now time.Time) (bool, error) {
	if err := s.lock(); err != nil {
		return false, err
	}
	defer s.mu.Unlock()
	if s.seen(ev.ID, now) {
		return true, nil
	}
	if !keyExpiry.IsZero() {
		s.keys[ev.ID] = keyExpiry
	}
	if len(targets) == 0 {
		return false, nil
	}
	e := &memEvent{ev: *ev, owed: len(targets)}
	e.ev.Body = append([]byte(nil), ev.Body...)
	s.events[ev.ID] = e
	for _, t := range targets {
		m := s.pending[t]
		if m == nil {
			m = map[ID]*Delivery{}
			s.pending[t] = m
		}
		m[ev.ID] = &Delivery{ID: ev.ID, Target: t, ReceivedAt: ev.ReceivedAt, NextAt: now}
	}
	return false, nil
}

// Seen implements Store.
func (s *Memory) Seen(id ID, now time.Time) (bool, error) {
	if err := s.lock(); err != nil {
		return false, err
	}
	defer s.mu.Unlock()
	return s.seen(id, now), nil
}

// Event implements Store.
func (s *Memory) Event(id ID) (*Event, error) {
	if err := s.lock(); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	e, ok := s.events[id]
	if !ok {
		return nil, ErrNotFound
	}
	ev := e.ev
	return &ev, nil
}

func (s *Memory) release(id ID, e *memEvent) {
	if e.owed == 0 && e.dead == 0 {
		delete(s.events, id)
	}
}

// SettleLater implements Store, at once: there is nothing to wait for.
func (s *Memory) SettleLater(d *Delivery, o Outcome, then func(Change, error)) {
	then(s.Settle(d, o))
}

// Settle implements Store.
func (s *Memory) Settle(d *Delivery, o Outcome) (Change, error) {
	if err := s.lock(); err != nil {
		return Change{}, err
	}
	defer s.mu.Unlock()
	var ch Change
	e, ok := s.events[d.ID]
	if !ok {
		return ch, nil
	}
	p := s.pending[d.Target][d.ID]
	dl := s.dead[d.Target][d.ID]
	owed := e.owed
	switch o {
	case Retry:
		if p != nil {
			c := *d
			c.ReceivedAt = e.ev.ReceivedAt
			s.pending[d.Target][d.ID] = &c
		}
		return ch, nil
	case Dead:
		if p == nil {
			return ch, nil
		}
		delete(s.pending[d.Target], d.ID)
		if s.dead[d.Target] == nil {
			s.dead[d.Target] = map[ID]*Delivery{}
		}
		c := *d
		c.ReceivedAt = e.ev.ReceivedAt
		s.dead[d.Target][d.ID] = &c
		e.owed--
		e.dead++
		ch.Pending, ch.Dead = -1, 1
	case Delivered:
		if p != nil {
			delete(s.pending[d.Target], d.ID)
			e.owed--
			ch.Pending = -1
		}
		if dl != nil {
			delete(s.dead[d.Target], d.ID)
			e.dead--
			ch.Dead = -1
		}
	}
	if owed > 0 && e.owed == 0 {
		ch.PendingEvents = -1
	}
	s.release(d.ID, e)
	return ch, nil
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

// Backlog implements Store: a copy taken under the lock.
func (s *Memory) Backlog() (Backlog, error) {
	if err := s.lock(); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	b := &memBacklog{dead: map[string]int{}}
	for _, e := range s.events {
		if e.owed > 0 {
			b.pendingEvents++
		}
	}
	for _, t := range sortedKeys(s.pending) {
		if len(s.pending[t]) == 0 {
			continue
		}
		b.targets = append(b.targets, t)
		for _, d := range sortedDeliveries(s.pending[t]) {
			c := *d
			b.pending = append(b.pending, &c)
		}
	}
	for t, m := range s.dead {
		if len(m) > 0 {
			b.dead[t] = len(m)
		}
	}
	return b, nil
}

type memBacklog struct {
	pendingEvents int
	targets       []string
	pending       []*Delivery
	dead          map[string]int
}

func (b *memBacklog) PendingEvents() int            { return b.pendingEvents }
func (b *memBacklog) Targets() []string             { return b.targets }
func (b *memBacklog) DeadTargets() []string         { return sortedKeys(b.dead) }
func (b *memBacklog) Dead() (map[string]int, error) { return b.dead, nil }
func (b *memBacklog) Close() error                  { return nil }

func (b *memBacklog) Pending(fn func(d *Delivery) error) error {
	for _, d := range b.pending {
		if err := fn(d); err != nil {
			return err
		}
	}
	return nil
}

// OldestPending implements Store.
func (s *Memory) OldestPending(target string) (time.Time, bool, error) {
	if err := s.lock(); err != nil {
		return time.Time{}, false, err
	}
	defer s.mu.Unlock()
	var oldest time.Time
	for _, d := range s.pending[target] {
		if oldest.IsZero() || d.ReceivedAt.Before(oldest) {
			oldest = d.ReceivedAt
		}
	}
	return oldest, !oldest.IsZero(), nil
}

// KillTarget implements Store.
func (s *Memory) KillTarget(target, reason string, now time.Time) (int, int, error) {
	if err := s.lock(); err != nil {
		return 0, 0, err
	}
	defer s.mu.Unlock()
	n, settled := 0, 0
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
				settled++
			}
		}
		n++
	}
	delete(s.pending, target)
	return n, settled, nil
}

// DeadLetters implements Store.
func (s *Memory) DeadLetters(target, cursor string, limit int) ([]DeadLetter, string, error) {
	var fromTarget string
	var fromRef []byte
	if cursor != "" {
		var err error
		if fromTarget, fromRef, err = decodeCursor(cursor); err != nil {
			return nil, "", err
		}
	}
	if limit <= 0 {
		limit = 100
	}
	if err := s.lock(); err != nil {
		return nil, "", err
	}
	defer s.mu.Unlock()
	names := sortedKeys(s.dead)
	if target != "" {
		names = []string{target}
	}
	var list []DeadLetter
	for _, t := range names {
		if fromTarget != "" && t < fromTarget {
			continue
		}
		for _, d := range sortedDeliveries(s.dead[t]) {
			ref := makeRef(d.ReceivedAt, d.ID)
			if t == fromTarget && fromRef != nil && bytes.Compare(ref, fromRef) <= 0 {
				continue
			}
			if len(list) == limit {
				last := list[len(list)-1]
				return list, encodeCursor(last.Target, makeRef(last.ReceivedAt, last.ID)), nil
			}
			dl := DeadLetter{Delivery: *d}
			if e := s.events[d.ID]; e != nil {
				dl.ContentType = e.ev.ContentType
				dl.Body = append([]byte(nil), e.ev.Body...)
			}
			list = append(list, dl)
		}
	}
	return list, "", nil
}

// Replay implements Store.
func (s *Memory) Replay(ids []ID, target string, keep func(string) bool, now time.Time) ([]Delivery, int, error) {
	if err := s.lock(); err != nil {
		return nil, 0, err
	}
	defer s.mu.Unlock()
	var out []Delivery
	revived := 0
	for _, t := range sortedKeys(s.dead) {
		if (target != "" && t != target) || (keep != nil && !keep(t)) {
			continue
		}
		var move []*Delivery
		if len(ids) == 0 {
			move = sortedDeliveries(s.dead[t])
		} else {
			for _, id := range ids {
				if d := s.dead[t][id]; d != nil {
					move = append(move, d)
				}
			}
		}
		for _, d := range move {
			delete(s.dead[t], d.ID)
			if s.pending[t] == nil {
				s.pending[t] = map[ID]*Delivery{}
			}
			nd := Delivery{ID: d.ID, Target: t, ReceivedAt: d.ReceivedAt, NextAt: now}
			s.pending[t][d.ID] = &nd
			if e := s.events[d.ID]; e != nil {
				if e.owed == 0 {
					revived++
				}
				e.owed++
				e.dead--
			}
			out = append(out, nd)
		}
	}
	return out, revived, nil
}

// DeleteDead implements Store.
func (s *Memory) DeleteDead(id ID, target string) (map[string]int, error) {
	if err := s.lock(); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	n := map[string]int{}
	e := s.events[id]
	for t, m := range s.dead {
		if target != "" && t != target {
			continue
		}
		if _, ok := m[id]; ok {
			delete(m, id)
			n[t]++
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

// ExpireKeys implements Store.
func (s *Memory) ExpireKeys(now time.Time) (int, error) {
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
	return n, nil
}

// Stats implements Store.
func (s *Memory) Stats(now time.Time) (Stats, error) {
	if err := s.lock(); err != nil {
		return Stats{}, err
	}
	defer s.mu.Unlock()
	st := Stats{Pending: map[string]int{}, Dead: map[string]int{}, Keys: len(s.keys)}
	for _, e := range s.events {
		if e.owed > 0 {
			st.PendingEvents++
		}
	}
	for t, m := range s.pending {
		if len(m) > 0 {
			st.Pending[t] = len(m)
		}
	}
	for t, m := range s.dead {
		if len(m) > 0 {
			st.Dead[t] = len(m)
		}
	}
	return st, nil
}

var _ Store = (*Memory)(nil)
