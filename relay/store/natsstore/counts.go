package natsstore

import (
	"context"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

const (
	// countsTTL is how long counts are served from the cache, and
	// countsDirtyTTL how long once this instance changed them: so that
	// an instance sees its own writes soon, yet asks the server at most
	// ten times a second while it writes.
	countsTTL      = time.Second
	countsDirtyTTL = 100 * time.Millisecond
	// exactLimit is the most deliveries for which PendingEvents is counted
	// exactly, by listing every pending subject; above it, it is the
	// number of deliveries pending (an upper bound: an event owed to two
	// targets counts twice).
	exactLimit = 1000
	// limitTTL is how long Accept checks max_pending against one reading
	// of the stream's message count, plus this instance's accepts since.
	limitTTL = 250 * time.Millisecond
)

// pendingForLimit returns the relay's pending events as max_pending
// counts them, read at most once per limitTTL, the cheapest reading the
// server gives (so that intake under a burst lists no subjects or
// consumers): exact while at most exactLimit deliveries are pending, else
// the pending deliveries (an upper bound: an event owed to two targets
// counts twice, so a relay refuses a little early rather than late). The
// events this instance accepted since the reading are added.
func (s *Store) pendingForLimit(ctx context.Context, obj *objects) (int, error) {
	n, err := s.limit.get(limitTTL, limitTTL, func() (int, error) { return s.fetchPending(ctx, obj) }, nil)
	if err != nil {
		return 0, unavailable("counting", err)
	}
	return n, nil
}

// fetchPending reads the pending events from the server (see
// pendingForLimit).
func (s *Store) fetchPending(ctx context.Context, obj *objects) (int, error) {
	info, err := obj.stream.Info(ctx)
	if err != nil {
		return 0, err
	}
	n := info.State.Msgs
	if n == 0 || n > exactLimit {
		return int(n), nil
	}
	info, err = obj.stream.Info(ctx, jetstream.WithSubjectFilter(s.n.stream+".d.>"))
	if err != nil {
		return 0, err
	}
	return distinctEvents(info.State.Subjects), nil
}

// distinctEvents counts the events among pending subjects.
func distinctEvents(subjects map[string]uint64) int {
	events := map[store.ID]bool{}
	for subj := range subjects {
		if _, _, id, err := splitSubject(subj); err == nil {
			events[id] = true
		}
	}
	return len(events)
}

// reading is a value read from the server and served from memory for a
// while: one caller reads it again at a time, the others get the last
// reading meanwhile. Local changes (an accept) move it until the next
// reading, and make it be read again sooner (dirtyTTL), so that an
// instance sees its own writes.
type reading[T any] struct {
	mu         sync.Mutex
	at         time.Time
	v          T
	ok         bool
	dirty      bool // this instance wrote since the last reading
	refreshing bool
}

// get returns the value, reading it with fetch when it is older than ttl
// (dirtyTTL after a local change); copyOf, if set, copies a value that
// callers must not share.
func (r *reading[T]) get(ttl, dirtyTTL time.Duration, fetch func() (T, error), copyOf func(T) T) (T, error) {
	if copyOf == nil {
		copyOf = func(v T) T { return v }
	}
	r.mu.Lock()
	if r.dirty {
		ttl = dirtyTTL
	}
	if r.ok && (time.Since(r.at) < ttl || r.refreshing) {
		v := copyOf(r.v)
		r.mu.Unlock()
		return v, nil
	}
	r.refreshing, r.dirty = true, false
	r.mu.Unlock()
	v, err := fetch()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.refreshing = false
	if err != nil {
		r.dirty = true
		var zero T
		return zero, err
	}
	r.v, r.at, r.ok = v, time.Now(), true
	return copyOf(v), nil
}

// change applies a local change to the last reading (if any) until the
// next one.
func (r *reading[T]) change(fn func(v *T)) {
	r.mu.Lock()
	if r.ok {
		fn(&r.v)
	}
	r.dirty = true
	r.mu.Unlock()
}

// touch says this instance changed what the value counts.
func (r *reading[T]) touch() { r.change(func(*T) {}) }

// invalidate makes the next get read afresh.
func (r *reading[T]) invalidate() {
	r.mu.Lock()
	r.ok = false
	r.mu.Unlock()
}

// Counts implements store.Store: the relay's counts, from the server, at
// most once a second (ten times while this instance writes, so that its
// own writes show within 100 ms). Pending and OldestPending come from the target's
// subjects (OldestPending is the receipt time of its first message by
// stream order: a replayed old event sorts by its replay). PendingEvents
// is exact up to exactLimit deliveries pending, see there.
func (s *Store) Counts(ctx context.Context) (store.Counts, error) {
	obj, err := s.ready()
	if err != nil {
		return store.Counts{}, err
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	return s.cachedCounts(ctx, obj)
}

func (s *Store) cachedCounts(ctx context.Context, obj *objects) (store.Counts, error) {
	c, err := s.counts.get(countsTTL, countsDirtyTTL, func() (store.Counts, error) { return s.fetchCounts(ctx, obj) }, copyCounts)
	if err != nil {
		return store.Counts{}, unavailable("counting", err)
	}
	return c, nil
}

func copyCounts(c store.Counts) store.Counts {
	out := store.Counts{PendingEvents: c.PendingEvents, Targets: make(map[string]store.TargetCounts, len(c.Targets))}
	for t, tc := range c.Targets {
		out.Targets[t] = tc
	}
	return out
}

func (s *Store) fetchCounts(ctx context.Context, obj *objects) (store.Counts, error) {
	// The targets: every consumer (each target some instance has queued),
	// this instance's queues, and, while the streams are small, every
	// target with a message.
	toks := map[string]bool{}
	s.mu.Lock()
	for _, q := range s.queues {
		toks[q.tok] = true
	}
	s.mu.Unlock()
	names := obj.stream.ConsumerNames(ctx)
	for name := range names.Name() {
		toks[name] = true
	}
	if err := names.Err(); err != nil {
		return store.Counts{}, err
	}
	info, err := obj.stream.Info(ctx)
	if err != nil {
		return store.Counts{}, err
	}
	c := store.Counts{PendingEvents: int(info.State.Msgs), Targets: map[string]store.TargetCounts{}}
	if n := info.State.Msgs; n > 0 && n <= exactLimit {
		info, err := obj.stream.Info(ctx, jetstream.WithSubjectFilter(s.n.stream+".d.>"))
		if err != nil {
			return store.Counts{}, err
		}
		for subj := range info.State.Subjects {
			if tok := subjectToken(subj); tok != "" {
				toks[tok] = true
			}
		}
		c.PendingEvents = distinctEvents(info.State.Subjects)
	}
	if dinfo, err := obj.dead.Info(ctx); err != nil {
		return store.Counts{}, err
	} else if n := dinfo.State.Msgs; n > 0 && n <= exactLimit {
		dinfo, err := obj.dead.Info(ctx, jetstream.WithSubjectFilter(s.n.dead+".>"))
		if err != nil {
			return store.Counts{}, err
		}
		for subj := range dinfo.State.Subjects {
			if tok := subjectToken(subj); tok != "" {
				toks[tok] = true
			}
		}
	}
	for tok := range toks {
		target, err := targetOf(tok)
		if err != nil {
			continue // another application's consumer
		}
		var tc store.TargetCounts
		msgs, left, err := directBatch(ctx, s.nc, s.n.stream, s.n.pendingFilter(tok), 0, 1)
		if err != nil {
			return store.Counts{}, err
		}
		if len(msgs) > 0 {
			tc.Pending = len(msgs) + int(left)
			tc.OldestPending = receivedAt(msgs[0].header)
		}
		msgs, left, err = directBatch(ctx, s.nc, s.n.dead, s.n.deadFilter(tok), 0, 1)
		if err != nil {
			return store.Counts{}, err
		}
		tc.Dead = len(msgs) + int(left)
		if tc.Pending > 0 || tc.Dead > 0 {
			c.Targets[target] = tc
		}
	}
	return c, nil
}
