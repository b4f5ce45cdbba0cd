package natsstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// recordReads is how many attempt records a listing reads at once: one
// round trip each, which one after the other would pace a page of a
// thousand.
const recordReads = 16

// pageStart is the stream sequence a page starts at: after the cursor,
// the sequence of the last message of the page before.
func pageStart(cursor string) (uint64, error) {
	if cursor == "" {
		return 1, nil
	}
	c, err := strconv.ParseUint(cursor, 10, 64)
	if err != nil {
		return 0, errors.New("invalid cursor")
	}
	return c + 1, nil
}

// ListPending implements store.Store: the deliveries in the work-queue
// stream's order (when each was stored; a retry stays where it was, a
// replay comes last), read with direct gets, which leave the consumers
// alone: a delivery leased now is listed like any other. The cursor is
// the stream sequence of the last one listed. A page may be shorter than
// limit when the messages' bodies fill the server's batch.
func (s *Store) ListPending(ctx context.Context, target, cursor string, limit int) ([]store.Delivery, string, error) {
	obj, err := s.ready()
	if err != nil {
		return nil, "", err
	}
	limit = store.ListLimit(limit)
	from, err := pageStart(cursor)
	if err != nil {
		return nil, "", err
	}
	filter := s.n.stream + ".d.>"
	if target != "" {
		filter = s.n.pendingFilter(token(target))
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	var msgs []rawMsg
	var left uint64
	err = unanswered(ctx, func(ctx context.Context) (err error) {
		msgs, left, err = directBatch(ctx, s.nc, s.n.stream, filter, from, limit)
		return err
	})
	if err != nil {
		return nil, "", unavailable("listing pending deliveries", err)
	}
	list := make([]store.Delivery, 0, len(msgs))
	for _, m := range msgs {
		d, err := pendingDelivery(m)
		if err != nil {
			// Not a message this package wrote: the queue drops it.
			continue
		}
		list = append(list, d)
	}
	if err := s.readRecords(ctx, obj, list, msgs); err != nil {
		return nil, "", err
	}
	next := ""
	if left > 0 && len(msgs) > 0 {
		next = strconv.FormatUint(msgs[len(msgs)-1].seq, 10)
	}
	return list, next, nil
}

// pendingDelivery is the delivery a work-queue message stands for, as
// Accept stored it: no attempts, due at its receipt.
func pendingDelivery(m rawMsg) (store.Delivery, error) {
	target, keyTok, id, err := splitSubject(m.subject)
	if err != nil {
		return store.Delivery{}, err
	}
	at := receivedAt(m.header)
	d := store.Delivery{ID: id, Target: target, ReceivedAt: at, NextAt: at}
	if keyTok != "" {
		d.OrderKey = decodeOrderKey(m.header.Get(hdrOrderKey))
	}
	return d, nil
}

// readRecords fills in the attempts of list from the attempt records,
// recordReads at a time. A delivery copied from another store (migrate)
// whose record is gone has its attempts in a header; msgs are the
// messages, found again by subject for that.
func (s *Store) readRecords(ctx context.Context, obj *objects, list []store.Delivery, msgs []rawMsg) error {
	headers := map[string]string{}
	for _, m := range msgs {
		if h := m.header.Get(hdrDelivery); h != "" {
			target, _, id, err := splitSubject(m.subject)
			if err == nil {
				headers[attemptKey(token(target), id)] = h
			}
		}
	}
	errs := make([]error, len(list))
	sem := make(chan struct{}, recordReads)
	var wg sync.WaitGroup
	for i := range list {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			errs[i] = s.readRecord(ctx, obj, &list[i], headers)
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// readRecord reads d's attempt record, if it has one, into d. A record
// that cannot be decoded counts as none, as the queue counts it.
func (s *Store) readRecord(ctx context.Context, obj *objects, d *store.Delivery, headers map[string]string) error {
	key := attemptKey(token(d.Target), d.ID)
	var e jetstream.KeyValueEntry
	err := unanswered(ctx, func(ctx context.Context) (err error) {
		e, err = obj.attempts.Get(ctx, key)
		return err
	})
	var rec []byte
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		h, ok := headers[key]
		if !ok {
			return nil
		}
		rec = []byte(h)
	case err != nil:
		return unavailable("reading attempt record", err)
	default:
		rec = e.Value()
	}
	fresh := *d
	if decodeRecord(rec, d) != nil {
		*d = fresh
		return nil
	}
	// The message's key is the one its subject orders it by.
	d.OrderKey = fresh.OrderKey
	return nil
}

// Lookup implements store.Store: the event's deliveries and dead letters
// by subject filters that end in its id. Its deliveries with an order key
// are found by a filter with a wildcard for the key, which reads every
// pending subject of the stream (as Seen does when nothing else finds
// the event): fine for a request of an operator.
func (s *Store) Lookup(ctx context.Context, id store.ID) (store.EventState, error) {
	obj, err := s.ready()
	if err != nil {
		return store.EventState{}, err
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	lookups := []struct{ stream, filter string }{
		{s.n.stream, s.n.stream + ".d.*." + id.String()},
		{s.n.stream, s.n.stream + ".d.*.*." + id.String()},
		{s.n.dead, s.n.dead + ".*." + id.String()},
	}
	found := make([][]rawMsg, len(lookups))
	errs := make([]error, len(lookups))
	var wg sync.WaitGroup
	for i, l := range lookups {
		wg.Go(func() { found[i], errs[i] = s.readAll(ctx, l.stream, l.filter) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return store.EventState{}, unavailable("looking up event", err)
	}
	var st store.EventState
	var pendingMsgs []rawMsg
	for _, m := range slices.Concat(found[0], found[1]) {
		d, err := pendingDelivery(m)
		if err != nil || d.ID != id {
			continue
		}
		st.Pending = append(st.Pending, d)
		pendingMsgs = append(pendingMsgs, m)
		if st.Event == nil {
			st.Event = &store.Event{ID: id, ReceivedAt: d.ReceivedAt, ContentType: m.header.Get(hdrContentType), Body: m.data}
		}
	}
	for _, m := range found[2] {
		dl, err := decodeDead(m)
		if err != nil || dl.ID != id {
			continue
		}
		st.Dead = append(st.Dead, dl)
		if st.Event == nil {
			st.Event = &store.Event{ID: id, ReceivedAt: dl.ReceivedAt, ContentType: dl.ContentType, Body: dl.Body}
		}
	}
	if st.Event == nil {
		return store.EventState{}, fmt.Errorf("looking up event %s: %w", id, store.ErrNotFound)
	}
	if err := s.readRecords(ctx, obj, st.Pending, pendingMsgs); err != nil {
		return store.EventState{}, err
	}
	slices.SortFunc(st.Pending, func(a, b store.Delivery) int { return cmp.Compare(a.Target, b.Target) })
	slices.SortFunc(st.Dead, func(a, b store.DeadLetter) int { return cmp.Compare(a.Target, b.Target) })
	return st, nil
}

// readAll reads every message of stream on filter, walkBatch at a time.
func (s *Store) readAll(ctx context.Context, stream, filter string) ([]rawMsg, error) {
	var all []rawMsg
	var from uint64
	for {
		var msgs []rawMsg
		var left uint64
		err := unanswered(ctx, func(ctx context.Context) (err error) {
			msgs, left, err = directBatch(ctx, s.nc, stream, filter, from, walkBatch)
			return err
		})
		if err != nil {
			return nil, err
		}
		all = append(all, msgs...)
		if left == 0 || len(msgs) == 0 {
			return all, nil
		}
		from = msgs[len(msgs)-1].seq + 1
	}
}
