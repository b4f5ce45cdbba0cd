package natsstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

const (
	// defaultLease is a target's AckWait when its queue asks for none.
	defaultLease = 30 * time.Second
	// fetchWait is how long one pull waits for messages; a Close or
	// Retire interrupts it.
	fetchWait = 5 * time.Second
	// fetchBatch caps one pull: an instance takes only what its waiting
	// workers can start, and leaves the rest to the others.
	fetchBatch = 16
	// recordKeep keeps an attempt record this long past its next attempt,
	// so that one orphaned by a crash between ack and delete goes too.
	recordKeep = 30 * 24 * time.Hour
)

// queue is one target's consumer as seen by this instance: a fetch loop
// that pulls as many messages as there are Takes waiting, and a small
// buffer between them, so that a Take cancelled while its pull was under
// way loses nothing (what nobody takes goes back to the server).
type queue struct {
	s      *Store
	target string
	tok    string
	ctx    context.Context
	cancel context.CancelFunc
	demand chan struct{}
	done   chan struct{}

	mu      sync.Mutex
	lease   time.Duration
	cons    jetstream.Consumer // nil until ensured, or after the server lost it
	dirty   bool               // lease changed since the consumer was ensured
	waiters int
	ready   []*lease
	avail   chan struct{} // closed when ready gains a lease or the queue stops
	stopped bool
	lastErr string // the consumer error last logged
}

// Queue implements store.Store. The queue's consumer is created (or its
// AckWait updated to opts.Lease) when the store is up.
func (s *Store) Queue(target string, opts store.QueueOptions) (store.Queue, error) {
	if target == "" {
		return nil, errors.New("queue needs a target name")
	}
	lease := opts.Lease
	if lease <= 0 {
		lease = defaultLease
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, store.ErrClosed
	}
	if q := s.queues[target]; q != nil {
		q.mu.Lock()
		changed := q.lease != lease
		if changed {
			q.lease, q.dirty = lease, true
		}
		q.mu.Unlock()
		if changed {
			// Now rather than at the next pull, which may be seconds off;
			// the loop tries again if this fails.
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				q.consumer()
			}()
		}
		return q, nil
	}
	ctx, cancel := context.WithCancel(s.ctx)
	q := &queue{
		s:      s,
		target: target,
		tok:    token(target),
		ctx:    ctx,
		cancel: cancel,
		demand: make(chan struct{}, 1),
		done:   make(chan struct{}),
		lease:  lease,
		avail:  make(chan struct{}),
	}
	s.queues[target] = q
	s.wg.Add(1)
	go q.run()
	return q, nil
}

// Retire implements store.Store. On a shared store the target's
// deliveries stay for the instances that still have it.
func (s *Store) Retire(ctx context.Context, target, reason string) (int, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return 0, store.ErrClosed
	}
	q := s.queues[target]
	delete(s.queues, target)
	s.mu.Unlock()
	if q != nil {
		q.shut()
	}
	return 0, nil
}

// shut stops the queue: Takes get ErrClosed, the fetch loop ends, and
// what it fetched for nobody goes back to the server at once. A pull
// under way is left to end by itself (within fetchWait), and what it
// still brings goes back too: cut short, the client would drop the
// messages it had in hand unacknowledged, and they would wait out a lease
// before another instance got them. Close cuts it short all the same, as
// a crash would.
func (q *queue) shut() {
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		return
	}
	q.stopped = true
	left := q.ready
	q.ready = nil
	close(q.avail)
	q.mu.Unlock()
	select {
	case q.demand <- struct{}{}: // an idle loop: end now
	default:
	}
	for _, l := range left {
		_ = l.m.Nak()
	}
}

// Take implements store.Queue.
func (q *queue) Take(ctx context.Context) (store.Lease, error) {
	for {
		q.mu.Lock()
		if q.stopped {
			q.mu.Unlock()
			return nil, store.ErrClosed
		}
		if len(q.ready) > 0 {
			l := q.ready[0]
			q.ready[0] = nil
			q.ready = q.ready[1:]
			q.mu.Unlock()
			if time.Since(l.fetched) > time.Second {
				// It waited here: give the taker the whole lease.
				_ = l.m.InProgress()
			}
			return l, nil
		}
		q.waiters++
		ch := q.avail
		q.mu.Unlock()
		select {
		case q.demand <- struct{}{}:
		default:
		}
		var err error
		select {
		case <-ch:
		case <-ctx.Done():
			err = ctx.Err()
		}
		q.mu.Lock()
		q.waiters--
		q.mu.Unlock()
		if err != nil {
			return nil, err
		}
	}
}

// want is how many messages the loop should pull now. It also sends back
// leases fetched for a Take that gave up and left unclaimed for half the
// lease, so that they do not lapse here.
func (q *queue) want() (n int, idle, stopped bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.stopped {
		return 0, true, true
	}
	keep := q.ready[:0]
	for _, l := range q.ready {
		if time.Since(l.fetched) > q.lease/2 {
			_ = l.m.Nak()
			continue
		}
		keep = append(keep, l)
	}
	clear(q.ready[len(keep):])
	q.ready = keep
	return min(q.waiters-len(q.ready), fetchBatch), len(q.ready) == 0, false
}

func (q *queue) run() {
	defer q.s.wg.Done()
	defer close(q.done)
	defer q.cancel()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for q.ctx.Err() == nil {
		n, idle, stopped := q.want()
		if stopped {
			return
		}
		if n <= 0 {
			var tc <-chan time.Time
			if !idle {
				tc = tick.C
			}
			select {
			case <-q.ctx.Done():
			case <-q.demand:
			case <-tc:
			}
			continue
		}
		cons := q.consumer()
		if cons == nil {
			continue
		}
		// Getting the consumer may have waited (a store down, a
		// retire): what is wanted now?
		if n, _, stopped = q.want(); stopped || n <= 0 {
			continue
		}
		q.fetch(cons, n)
	}
}

// consumer returns the target's consumer once the store is up, creating
// it or updating its AckWait as needed; nil when the loop should look
// again (stopped, or the server said no: it waits a second then).
func (q *queue) consumer() jetstream.Consumer {
	s := q.s
	obj, err := s.ready()
	if err != nil {
		s.mu.Lock()
		ch := s.upCh
		s.mu.Unlock()
		select {
		case <-ch:
		case <-q.ctx.Done():
		}
		return nil
	}
	q.mu.Lock()
	c, dirty, lease := q.cons, q.dirty, q.lease
	q.mu.Unlock()
	if c != nil && !dirty {
		return c
	}
	ctx, cancel := s.bounded(q.ctx)
	defer cancel()
	err = unanswered(ctx, func(ctx context.Context) (err error) {
		c, err = obj.stream.CreateOrUpdateConsumer(ctx, s.consumerConfig(q.tok, lease))
		return err
	})
	if err != nil {
		if q.ctx.Err() == nil {
			q.mu.Lock()
			if msg := err.Error(); msg != q.lastErr {
				q.lastErr = msg
				s.log.Warn("nats consumer", zap.String("target", q.target), zap.Error(err))
			}
			q.mu.Unlock()
			q.pause(time.Second)
		}
		return nil
	}
	q.mu.Lock()
	q.cons, q.lastErr = c, ""
	if q.lease == lease {
		q.dirty = false
	}
	q.mu.Unlock()
	return c
}

func (q *queue) pause(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-q.ctx.Done():
	}
}

// fetch pulls up to n messages and readies the due ones.
func (q *queue) fetch(cons jetstream.Consumer, n int) {
	ctx, cancel := context.WithTimeout(q.ctx, fetchWait)
	defer cancel()
	batch, err := cons.Fetch(n, jetstream.FetchContext(ctx), jetstream.FetchHeartbeat(time.Second))
	if err == nil {
		for m := range batch.Messages() {
			if l := q.prepare(m); l != nil {
				q.push(l)
			}
		}
		err = batch.Error()
	}
	switch {
	case err == nil, q.ctx.Err() != nil, errors.Is(err, context.DeadlineExceeded):
	default:
		// The consumer may be gone (a server that lost its files, an
		// operator): ensure it again before the next pull.
		q.s.log.Debug("nats fetch", zap.String("target", q.target), zap.Error(err))
		q.mu.Lock()
		q.cons = nil
		q.mu.Unlock()
		q.pause(250 * time.Millisecond)
	}
}

func (q *queue) push(l *lease) {
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		_ = l.m.Nak()
		return
	}
	q.ready = append(q.ready, l)
	close(q.avail)
	q.avail = make(chan struct{})
	q.mu.Unlock()
}

// prepare turns a fetched message into a lease, or puts it back: a
// message redelivered before its next attempt is due (a restarted server
// forgets the delay of a nak) waits out the rest without an attempt.
func (q *queue) prepare(m jetstream.Msg) *lease {
	s := q.s
	md, err := m.Metadata()
	if err != nil {
		s.log.Warn("nats message without metadata", zap.String("target", q.target), zap.Error(err))
		return nil
	}
	_, id, err := splitSubject(m.Subject())
	if err != nil {
		// Not a message this package wrote: it would come back forever.
		s.log.Warn("nats message not a delivery, dropped", zap.String("subject", m.Subject()))
		_ = m.TermWithReason("not a webhook-relay delivery")
		return nil
	}
	h := m.Headers()
	at := receivedAt(h)
	l := &lease{
		q:       q,
		m:       m,
		fetched: time.Now(),
		// A delivery copied from another store with its attempts
		// (migrate) has a record before its first delivery, and says
		// so in a header.
		again: md.NumDelivered > 1 || h.Get(hdrDelivery) != "",
		seq:   md.Sequence.Stream,
		d:     store.Delivery{ID: id, Target: q.target, ReceivedAt: at, NextAt: at},
		ev:    store.Event{ID: id, ReceivedAt: at, ContentType: h.Get(hdrContentType), Body: m.Data()},
	}
	if !l.again {
		return l
	}
	obj, err := s.ready()
	if err != nil {
		_ = m.NakWithDelay(time.Second)
		return nil
	}
	ctx, cancel := s.bounded(q.ctx)
	defer cancel()
	e, err := obj.attempts.Get(ctx, attemptKey(q.tok, id))
	var rec []byte
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		// A copied delivery whose record is gone: its header is the
		// best there is.
		if hr := h.Get(hdrDelivery); hr != "" {
			rec = []byte(hr)
		}
	case err != nil:
		_ = m.NakWithDelay(time.Second)
		return nil
	default:
		rec = e.Value()
	}
	if rec != nil {
		if err := decodeRecord(rec, &l.d); err != nil {
			s.log.Warn("bad attempt record, counting from zero", zap.String("target", q.target), zap.String("event_id", id.String()), zap.Error(err))
			l.d = store.Delivery{ID: id, Target: q.target, ReceivedAt: at, NextAt: at}
		}
	}
	if wait := l.d.NextAt.Sub(s.cfg.Now()); wait > 10*time.Millisecond {
		_ = m.NakWithDelay(wait)
		return nil
	}
	return l
}

// lease is one fetched message.
type lease struct {
	q       *queue
	m       jetstream.Msg
	d       store.Delivery
	ev      store.Event
	fetched time.Time
	seq     uint64 // stream sequence
	// again is true for a redelivery or a copied delivery with attempts:
	// only then can an attempt record or a dead letter of an earlier
	// round exist.
	again bool

	mu      sync.Mutex // one Settle at a time
	settled bool       // settled or postponed: later calls change nothing
}

func (l *lease) Delivery() store.Delivery { return l.d }

func (l *lease) Event() *store.Event {
	ev := l.ev
	return &ev
}

// Extend implements store.Lease: the consumer's AckWait starts again.
func (l *lease) Extend(ctx context.Context) error {
	ctx, cancel := l.q.s.bounded(ctx)
	defer cancel()
	if err := ackSync(ctx, l.q.s.nc, l.m, "+WPI"); err != nil {
		return unavailable("extending lease", err)
	}
	return nil
}

// Postpone implements store.Lease with a delayed nak: nothing stored
// changes, and the redelivery that follows is no attempt.
func (l *lease) Postpone(at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.settled {
		return
	}
	l.settled = true
	_ = l.m.NakWithDelay(at.Sub(l.q.s.cfg.Now()))
}

// Settle implements store.Lease.
func (l *lease) Settle(o store.Outcome, d *store.Delivery, then func(error)) {
	s := l.q.s
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		if then != nil {
			then(store.ErrClosed)
		}
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	dc := *d
	go func() {
		defer s.wg.Done()
		ctx, cancel := s.bounded(context.Background())
		defer cancel()
		err := l.settle(ctx, o, &dc)
		if then != nil {
			then(err)
		}
	}()
}

func (l *lease) settle(ctx context.Context, o store.Outcome, d *store.Delivery) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.settled {
		return nil
	}
	if err := l.record(ctx, o, d); err != nil {
		return err
	}
	l.settled = true
	if o != store.Retry {
		l.q.s.counts.touch()
	}
	return nil
}

func (l *lease) record(ctx context.Context, o store.Outcome, d *store.Delivery) error {
	s, tok, id := l.q.s, l.q.tok, l.d.ID
	obj, err := s.ready()
	if err != nil {
		return err
	}
	switch o {
	case store.Delivered:
		if l.again {
			// A dead letter of an earlier round whose term was lost.
			if _, err := purge(ctx, s.nc, s.n.dead, s.n.deadSubject(tok, id), 0); err != nil {
				return unavailable("settling delivery", err)
			}
		}
		if err := l.m.DoubleAck(ctx); err != nil {
			return unavailable("acknowledging delivery", err)
		}
		l.dropRecord(ctx, obj)
	case store.Retry:
		ttl := (max(d.NextAt.Sub(s.cfg.Now()), 0) + recordKeep).Truncate(time.Second)
		if err := s.kvPut(ctx, s.n.attempts, attemptKey(tok, id), encodeRecord(d), ttl); err != nil {
			return unavailable("recording attempt", err)
		}
		// The record is what counts: if this nak is lost, the message
		// comes back after AckWait and prepare puts it off again.
		if err := ackSync(ctx, s.nc, l.m, nakBody(d.NextAt.Sub(s.cfg.Now()))); err != nil {
			s.log.Debug("nats nak", zap.String("target", l.q.target), zap.String("event_id", id.String()), zap.Error(err))
		}
	case store.Dead:
		m := nats.NewMsg(s.n.deadSubject(tok, id))
		m.Header.Set(hdrReceivedAt, strconv.FormatInt(l.d.ReceivedAt.UnixNano(), 10))
		if l.ev.ContentType != "" {
			m.Header.Set(hdrContentType, l.ev.ContentType)
		}
		m.Header.Set(hdrDelivery, string(encodeRecord(d)))
		m.Data = l.ev.Body
		msgID := fmt.Sprintf("%s.%s.d%d", id, tok, l.seq)
		if _, err := s.publish(ctx, m, jetstream.WithMsgID(msgID)); err != nil {
			return unavailable("writing dead letter", err)
		}
		if err := ackSync(ctx, s.nc, l.m, "+TERM dead-lettered"); err != nil {
			return unavailable("terminating dead delivery", err)
		}
		l.dropRecord(ctx, obj)
	default:
		return fmt.Errorf("unknown outcome %d", o)
	}
	return nil
}

// dropRecord removes the attempt record once the delivery is gone; a
// failure leaves it to its TTL.
func (l *lease) dropRecord(ctx context.Context, obj *objects) {
	if !l.again {
		return
	}
	if err := obj.attempts.Purge(ctx, attemptKey(l.q.tok, l.d.ID), jetstream.PurgeTTL(markerTTL)); err != nil {
		l.q.s.log.Debug("dropping attempt record", zap.String("target", l.q.target), zap.Error(err))
	}
}
