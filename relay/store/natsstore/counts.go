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

// limitCache is what Accept checks max_pending against: one number per
// limitTTL, the cheapest the server gives (the stream's message count,
// or the distinct events while few are pending), so that intake under a
// burst does not list subjects or consumers.
type limitCache struct {
	mu         sync.Mutex
	at         time.Time
	n          int
	ok         bool
	refreshing bool
}

// bump counts an event this instance just accepted, until the next
// reading.
func (lc *limitCache) bump() {
	lc.mu.Lock()
	lc.n++
	lc.mu.Unlock()
}

// pendingForLimit returns the relay's pending events as max_pending
// counts them: exact while at most exactLimit deliveries are pending,
// else the pending deliveries (an upper bound: an event owed to two
// targets counts twice, so a relay refuses a little early rather than
// late).
func (s *Store) pendingForLimit(ctx context.Context, obj *objects) (int, error) {
	lc := &s.limit
	lc.mu.Lock()
	if lc.ok && (time.Since(lc.at) < limitTTL || lc.refreshing) {
		n := lc.n
		lc.mu.Unlock()
		return n, nil
	}
	lc.refreshing = true
	lc.mu.Unlock()
	n, err := s.fetchPending(ctx, obj)
	lc.mu.Lock()
	defer lc.mu.Unlock()
	lc.refreshing = false
	if err != nil {
		return 0, unavailable("counting", err)
	}
	lc.n, lc.at, lc.ok = n, time.Now(), true
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
		if _, id, err := splitSubject(subj); err == nil {
			events[id] = true
		}
	}
	return len(events)
}

type countCache struct {
	mu         sync.Mutex
	at         time.Time
	c          store.Counts
	ok         bool
	dirty      bool // this instance wrote since the counts were fetched
	refreshing bool
}

// bump counts an event this instance just accepted, until the next
// refresh brings the server's count.
func (cc *countCache) bump() {
	cc.mu.Lock()
	if cc.ok {
		cc.c.PendingEvents++
	}
	cc.dirty = true
	cc.mu.Unlock()
}

// touch says this instance changed the counts.
func (cc *countCache) touch() {
	cc.mu.Lock()
	cc.dirty = true
	cc.mu.Unlock()
}

func (cc *countCache) invalidate() {
	cc.mu.Lock()
	cc.ok = false
	cc.mu.Unlock()
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
	cc := &s.counts
	cc.mu.Lock()
	ttl := countsTTL
	if cc.dirty {
		ttl = countsDirtyTTL
	}
	if cc.ok && (time.Since(cc.at) < ttl || cc.refreshing) {
		c := copyCounts(cc.c)
		cc.mu.Unlock()
		return c, nil
	}
	cc.refreshing, cc.dirty = true, false
	cc.mu.Unlock()
	c, err := s.fetchCounts(ctx, obj)
	cc.mu.Lock()
	defer cc.mu.Unlock()
	cc.refreshing = false
	if err != nil {
		cc.dirty = true
		return store.Counts{}, unavailable("counting", err)
	}
	cc.c, cc.at, cc.ok = c, time.Now(), true
	return copyCounts(c), nil
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
			toks[subjectToken(subj)] = true
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
			toks[subjectToken(subj)] = true
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

// subjectToken is the target token of a pending or dead subject: the
// next to last.
func subjectToken(subj string) string {
	end := len(subj)
	for i := len(subj) - 1; i >= 0; i-- {
		if subj[i] == '.' {
			if end != len(subj) {
				return subj[i+1 : end]
			}
			end = i
		}
	}
	return ""
}
