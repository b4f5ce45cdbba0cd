package natsstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
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
	// filterCheck is how often a queue checks that its consumer still
	// filters what this release stores: an instance of a release from
	// before order keys sets the consumer's filter to deliveries without
	// one when it (re)creates it.
	filterCheck = 30 * time.Second
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
	ordered bool
	cons    jetstream.Consumer // nil until ensured, or after the server lost it
	dirty   bool               // lease changed since the consumer was ensured
	checked time.Time          // when the consumer's filter was last checked
	held    map[string]heldKey // by key token (see claim)
	parked  parkedLeases       // by key token, one each (see claim)
	asking  int                // fetched leases the server is being asked about
	asks    sync.WaitGroup     // their goroutines
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
		q.setOrderedLocked(opts.Ordered)
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
		s:       s,
		target:  target,
		tok:     token(target),
		ctx:     ctx,
		cancel:  cancel,
		demand:  make(chan struct{}, 1),
		done:    make(chan struct{}),
		lease:   lease,
		ordered: opts.Ordered,
		held:    map[string]heldKey{},
		parked:  parkedLeases{},
		avail:   make(chan struct{}),
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
	for k, l := range q.parked {
		left = append(left, l)
		delete(q.parked, k)
	}
	close(q.avail)
	q.mu.Unlock()
	select {
	case q.demand <- struct{}{}: // an idle loop: end now
	default:
	}
	for _, l := range left {
		l.q.release(l)
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
			lease := q.lease
			q.mu.Unlock()
			if time.Since(l.fetched) > min(time.Second, lease/4) {
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
			q.releaseLocked(l)
			_ = l.m.Nak()
			continue
		}
		keep = append(keep, l)
	}
	clear(q.ready[len(keep):])
	q.ready = keep
	for k, l := range q.parked {
		if time.Since(l.fetched) > q.lease/4 {
			delete(q.parked, k)
			_ = l.m.NakWithDelay(orderBackoff(l.looks(), q.waitMaxLocked()))
		}
	}
	// Leases being asked about count only beyond one per waiting Take:
	// the questions' round trips are then under way while the Takes are
	// served, instead of after.
	return min(q.waiters-len(q.ready)-max(q.asking-q.waiters, 0), fetchBatch), len(q.ready) == 0 && len(q.parked) == 0, false
}

func (q *queue) run() {
	defer q.s.wg.Done()
	defer close(q.done)
	defer q.asks.Wait()
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
	c, dirty, lease, checked := q.cons, q.dirty, q.lease, q.checked
	q.mu.Unlock()
	ctx, cancel := s.bounded(q.ctx)
	defer cancel()
	if c != nil && !dirty {
		if time.Since(checked) < filterCheck || q.filterOK(ctx, c) {
			return c
		}
	}
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
	q.cons, q.lastErr, q.checked = c, "", time.Now()
	if q.lease == lease {
		q.dirty = false
	}
	q.mu.Unlock()
	return c
}

// filterOK reports whether c still filters what this release stores; a
// consumer it cannot read now counts as fine (the pull will tell).
func (q *queue) filterOK(ctx context.Context, c jetstream.Consumer) bool {
	q.mu.Lock()
	q.checked = time.Now()
	q.mu.Unlock()
	info, err := c.Info(ctx)
	if err != nil {
		return true
	}
	want := q.s.n.pendingFilter(q.tok)
	if cfg := info.Config; cfg.FilterSubject == want && len(cfg.FilterSubjects) == 0 || slices.Equal(cfg.FilterSubjects, []string{want}) {
		return true
	}
	q.s.log.Warn("nats consumer filter changed, probably by an instance of an earlier release: setting it again",
		zap.String("target", q.target), zap.String("filter", info.Config.FilterSubject), zap.Strings("filters", info.Config.FilterSubjects), zap.String("want", want))
	return false
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
			switch l, ask := q.prepare(m); {
			case l == nil:
			case !ask:
				q.push(l)
			default:
				q.ask(l)
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

// ask checks l (see check) in a goroutine of its own, and readies it
// if it passes: one at a time, the server's round trips would pace the
// queue. The loop counts it as readied meanwhile, and pulls again if it
// goes back or waits. A delivery behind the head of its key waits here
// for the first few looks, rather than going back to the server and
// coming again: that would be two more messages each time.
func (q *queue) ask(l *lease) {
	q.mu.Lock()
	q.askLocked(l)
	q.mu.Unlock()
}

func (q *queue) askLocked(l *lease) {
	q.asking++
	q.asks.Go(func() {
		for {
			ok, again := q.check(l)
			q.mu.Lock()
			q.asking--
			q.mu.Unlock()
			if ok {
				q.push(l)
				return
			}
			q.poke()
			if again <= 0 {
				return
			}
			t := time.NewTimer(again)
			select {
			case <-t.C:
			case <-q.ctx.Done():
				t.Stop()
			}
			q.mu.Lock()
			if q.stopped || q.ctx.Err() != nil {
				q.releaseLocked(l)
				q.mu.Unlock()
				_ = l.m.Nak()
				return
			}
			q.asking++
			q.mu.Unlock()
		}
	})
}

// poke has the loop look at what is wanted again.
func (q *queue) poke() {
	select {
	case q.demand <- struct{}{}:
	default:
	}
}

func (q *queue) push(l *lease) {
	q.mu.Lock()
	if q.stopped {
		q.releaseLocked(l)
		q.mu.Unlock()
		_ = l.m.Nak()
		return
	}
	q.ready = append(q.ready, l)
	close(q.avail)
	q.avail = make(chan struct{})
	q.mu.Unlock()
}

// prepare turns a fetched message into a lease, or puts it back (nil).
// ask says that the server is to be asked about it (check) before it is
// readied: in an ordered queue whether it is the head of its key (see
// order.go), and for a redelivery its attempt record. What needs no
// question is readied in the order fetched.
func (q *queue) prepare(m jetstream.Msg) (l *lease, ask bool) {
	s := q.s
	md, err := m.Metadata()
	if err != nil {
		s.log.Warn("nats message without metadata", zap.String("target", q.target), zap.Error(err))
		return nil, false
	}
	_, keyTok, id, err := splitSubject(m.Subject())
	if err != nil {
		// Not a message this package wrote: it would come back forever.
		s.log.Warn("nats message not a delivery, dropped", zap.String("subject", m.Subject()))
		_ = m.TermWithReason("not a webhook-relay delivery")
		return nil, false
	}
	h := m.Headers()
	at := receivedAt(h)
	orderKey := ""
	if keyTok != "" {
		orderKey = decodeOrderKey(h.Get(hdrOrderKey))
	}
	l = &lease{
		q:       q,
		m:       m,
		fetched: time.Now(),
		// A delivery copied from another store with its attempts
		// (migrate) has a record before its first delivery, and says
		// so in a header.
		again:     md.NumDelivered > 1 || h.Get(hdrDelivery) != "",
		seq:       md.Sequence.Stream,
		delivered: md.NumDelivered,
		keyTok:    keyTok,
		d:         store.Delivery{ID: id, Target: q.target, ReceivedAt: at, NextAt: at, OrderKey: orderKey},
		ev:        store.Event{ID: id, ReceivedAt: at, ContentType: h.Get(hdrContentType), Body: m.Data()},
	}
	q.mu.Lock()
	l.ordered = q.ordered && keyTok != ""
	q.mu.Unlock()
	if l.ordered && !q.claim(l) {
		return nil, false
	}
	return l, l.ordered || l.again
}

// check asks the server what prepare could not tell about l, and says
// to ready it (true), to look again after again, or (neither) that it
// went back.
func (q *queue) check(l *lease) (ok bool, again time.Duration) {
	s := q.s
	q.mu.Lock()
	if l.ordered && !q.ordered {
		// No longer ordered since it was fetched.
		q.releaseLocked(l)
		l.ordered = false
	}
	q.mu.Unlock()
	putBack := func(d time.Duration) (bool, time.Duration) {
		q.release(l)
		_ = l.m.NakWithDelay(d)
		return false, 0
	}
	obj, err := s.ready()
	if err != nil {
		return putBack(time.Second)
	}
	ctx, cancel := s.bounded(q.ctx)
	defer cancel()
	if l.ordered {
		wait, err := q.headWait(ctx, obj, l)
		if err != nil {
			s.log.Debug("nats order check", zap.String("target", q.target), zap.Error(err))
			return putBack(time.Second)
		}
		if wait > 0 {
			if l.waits < orderWaitsHere && wait <= orderWaitMax {
				l.waits++
				return false, wait
			}
			return putBack(wait)
		}
	}
	if !l.again {
		return true, 0
	}
	e, err := obj.attempts.Get(ctx, attemptKey(q.tok, l.d.ID))
	var rec []byte
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		// A copied delivery whose record is gone: its header is the
		// best there is.
		if hr := l.m.Headers().Get(hdrDelivery); hr != "" {
			rec = []byte(hr)
		}
	case err != nil:
		return putBack(time.Second)
	default:
		rec = e.Value()
	}
	if rec != nil {
		fresh := l.d
		if err := decodeRecord(rec, &l.d); err != nil {
			s.log.Warn("bad attempt record, counting from zero", zap.String("target", q.target), zap.String("event_id", l.d.ID.String()), zap.Error(err))
			l.d = fresh
		}
		// The message's key is the one its subject orders it by.
		l.d.OrderKey = fresh.OrderKey
	}
	if wait := l.d.NextAt.Sub(s.cfg.Now()); wait > 10*time.Millisecond {
		return putBack(wait)
	}
	return true, 0
}

// parkedLeases are leases waiting here for an earlier one of their key.
type parkedLeases map[string]*lease

// lease is one fetched message.
type lease struct {
	q       *queue
	m       jetstream.Msg
	d       store.Delivery
	ev      store.Event
	fetched time.Time
	seq     uint64 // stream sequence
	// delivered is how many times the consumer has handed it out.
	delivered uint64
	keyTok    string // the order key's token, "" for none
	// ordered: in an ordered queue when fetched, and so held here as
	// the head of its key, or parked (see claim).
	ordered bool
	// waits is how many times it waited here behind its key's head.
	waits int
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
	l.q.release(l)
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
	l.q.release(l)
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
		// The key is the delivery's, whatever d says: a replay keeps it.
		d.OrderKey = l.d.OrderKey
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
