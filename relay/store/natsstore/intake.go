package natsstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// keyMargin keeps a dedupe key or key state in its bucket this long past
// its expiry: the stored expiry decides, the TTL only cleans up, so
// instances whose clocks differ a little still agree.
const keyMargin = time.Minute

// ttlFor is the bucket TTL of a record that expires at expiry; JetStream
// takes whole seconds of at least one.
func ttlFor(expiry, now time.Time) time.Duration {
	d := expiry.Sub(now)
	if d < 0 {
		d = 0
	}
	return (d + keyMargin).Truncate(time.Second)
}

func encodeExpiry(t time.Time) []byte {
	return binary.BigEndian.AppendUint64(nil, uint64(t.UnixNano()))
}

func decodeExpiry(b []byte) time.Time {
	if len(b) < 8 {
		return time.Time{}
	}
	return time.Unix(0, int64(binary.BigEndian.Uint64(b)))
}

// kvWrite puts value at key in bucket with a per-key TTL, if the key's
// last revision is rev (0: no value, or a delete marker's revision).
// nats.go's KeyValue.Update cannot set a TTL, so this publishes to the
// bucket's subject as the KV API does.
func (s *Store) kvWrite(ctx context.Context, bucket, key string, value []byte, rev uint64, ttl time.Duration) (uint64, error) {
	m := &nats.Msg{Subject: "$KV." + bucket + "." + key, Data: value}
	ack, err := s.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequencePerSubject(rev), jetstream.WithMsgTTL(ttl))
	if err != nil {
		return 0, err
	}
	return ack.Sequence, nil
}

// kvPut is kvWrite whatever the key holds.
func (s *Store) kvPut(ctx context.Context, bucket, key string, value []byte, ttl time.Duration) error {
	m := &nats.Msg{Subject: "$KV." + bucket + "." + key, Data: value}
	_, err := s.js.PublishMsg(ctx, m, jetstream.WithMsgTTL(ttl))
	return err
}

// Accept implements store.Store.
//
// Dedupe does not lean on the stream's Nats-Msg-Id window, which a NATS
// restart forgets under work-queue retention: the keys bucket holds each
// event id with its expiry (written once every delivery is stored), an
// event still stored (pending or dead) is looked up by its subjects, and
// each (event, target) has a subject of its own, published with "expect
// no message yet", so that racing publishes store one. Of instances that
// race with the same event, the one whose publish to the first target (by
// name) stored it answers accepted, the others duplicate; each has made
// sure that every delivery is stored before it answers. A publish that
// goes unanswered is made again (see unanswered); if the first was
// stored after all, the instance answers duplicate: never accepted for
// an event it did not see stored.
//
// MaxPending is checked against the stream's count (see pendingForLimit),
// at most limitTTL old and bumped by this instance's own accepts in
// between: on a shared store it is approximate.
//
// A delivery with an order key is on a subject of its own form (see
// pendingSubject), which the lookup by event id finds by its literal
// subject, as the key is known here: a filter with a wildcard in place of
// the key would read every pending subject. So an event stored with
// another order key at a target (by an instance whose order_by differs),
// and without a dedupe key, is found only by the stream's message ids,
// within their window.
func (s *Store) Accept(ctx context.Context, ev *store.Event, targets []string, opts store.AcceptOptions) (bool, error) {
	obj, err := s.ready()
	if err != nil {
		return false, err
	}
	if opts.OrderKeys != nil && len(opts.OrderKeys) != len(targets) {
		return false, fmt.Errorf("accepting event %s: %d order keys for %d targets", ev.ID, len(opts.OrderKeys), len(targets))
	}
	dests := make([]dest, len(targets))
	for i, t := range targets {
		dests[i] = dest{target: t, tok: token(t)}
		if opts.OrderKeys != nil && opts.OrderKeys[i] != "" {
			dests[i].key, dests[i].keyTok = opts.OrderKeys[i], keyToken(opts.OrderKeys[i])
		}
	}
	slices.SortStableFunc(dests, func(a, b dest) int { return strings.Compare(a.target, b.target) })
	dests = slices.CompactFunc(dests, func(a, b dest) bool { return a.target == b.target })
	var keyed []string
	for _, d := range dests {
		if d.keyTok != "" {
			keyed = append(keyed, s.n.pendingSubject(d.tok, d.keyTok, ev.ID))
		}
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	if dup, err := s.stored(ctx, obj, ev.ID, ev.ReceivedAt, keyed); err != nil || dup {
		return dup, err
	}
	if len(targets) == 0 {
		if opts.KeyExpiry.IsZero() {
			return false, nil
		}
		created, err := s.recordKey(ctx, obj, ev.ID, opts.KeyExpiry, ev.ReceivedAt)
		return !created, err
	}
	if opts.MaxPending > 0 {
		n, err := s.pendingForLimit(ctx, obj)
		if err != nil {
			return false, err
		}
		if n >= opts.MaxPending {
			return false, store.ErrFull
		}
	}
	stored := make([]bool, len(dests))
	errs := make([]error, len(dests))
	var wg sync.WaitGroup
	// Within the window, the message id stops a publish from storing
	// again a delivery that was delivered meanwhile: a sender retrying an
	// Accept that timed out. The key does the same for longer, and an
	// event whose key expires sooner (or that has none) must be new once
	// its key and deliveries are gone: it gets no message id.
	withID := opts.KeyExpiry.Sub(ev.ReceivedAt) >= obj.window
	for i, d := range dests {
		wg.Go(func() {
			msgID := ""
			if withID {
				// Without the key: two instances whose order_by differs
				// store the pair once all the same.
				msgID = ev.ID.String() + "." + d.tok
			}
			stored[i], errs[i] = s.publishDelivery(ctx, ev, d.tok, d.key, msgID)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		if errors.Is(err, nats.ErrMaxPayload) {
			// The server would refuse it on every try, and a 503 would
			// have the sender retry it for ever.
			return false, fmt.Errorf("%w: a %d-byte body with its headers is over the NATS server's max_payload of %d bytes (raise max_payload in its config, or lower max_body)",
				store.ErrTooLarge, len(ev.Body), s.nc.MaxPayload())
		}
		return false, unavailable("storing event", err)
	}
	if !opts.KeyExpiry.IsZero() {
		if _, err := s.recordKey(ctx, obj, ev.ID, opts.KeyExpiry, ev.ReceivedAt); err != nil {
			return false, err
		}
	}
	dup := !stored[0]
	if !dup {
		s.counts.change(func(c *store.Counts) { c.PendingEvents++ })
		s.limit.change(func(n *int) { *n++ })
	}
	return dup, nil
}

// dest is one target of an Accept, with its delivery's order key.
type dest struct {
	target, tok string
	key, keyTok string // "" for none
}

// publishDelivery stores ev's delivery at the target whose token is tok,
// with order key key ("" for none), unless its subject already holds one
// or the window holds msgID (if any), and reports whether this publish
// stored it.
func (s *Store) publishDelivery(ctx context.Context, ev *store.Event, tok, key, msgID string) (bool, error) {
	keyTok := ""
	if key != "" {
		keyTok = keyToken(key)
	}
	m := nats.NewMsg(s.n.pendingSubject(tok, keyTok, ev.ID))
	m.Header.Set(hdrReceivedAt, strconv.FormatInt(ev.ReceivedAt.UnixNano(), 10))
	if ev.ContentType != "" {
		m.Header.Set(hdrContentType, ev.ContentType)
	}
	if key != "" {
		m.Header.Set(hdrOrderKey, encodeOrderKey(key))
	}
	m.Data = ev.Body
	opts := []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(0)}
	if msgID != "" {
		opts = append(opts, jetstream.WithMsgID(msgID))
	}
	ack, err := s.publish(ctx, m, opts...)
	switch {
	case isWrongLastSeq(err):
		return false, nil
	case err != nil:
		if errors.Is(err, jetstream.ErrNoStreamResponse) {
			// The stream is gone while the store is up: set up again.
			s.poke()
		}
		return false, fmt.Errorf("publishing to %s: %w", m.Subject, err)
	}
	return !ack.Duplicate, nil
}

// publish publishes m and waits for its outcome. A replicated stream
// answers a publish whose message id, or whose subject under "expect no
// message yet", another publish is still proposing with a conflict (two
// instances storing one event at once): that is no outcome, so m goes
// again, with the same id, until the stream says stored, duplicate or
// wrong last sequence, or ctx ends.
func (s *Store) publish(ctx context.Context, m *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	var b inProcessBackoff
	for {
		var ack *jetstream.PubAck
		err := unanswered(ctx, func(ctx context.Context) (err error) {
			ack, err = s.js.PublishMsg(ctx, m, opts...)
			return err
		})
		if !inProcess(err) {
			return ack, err
		}
		if err := b.wait(ctx, err); err != nil {
			return nil, err
		}
	}
}

// inProcessBackoff spaces the retries of a write that another one of the
// same id or subject is still being proposed: a proposal takes a few
// milliseconds, an election a few seconds.
type inProcessBackoff struct{ d time.Duration }

// wait waits out the next delay, or returns an error once ctx is done:
// not the conflict itself (conflict is there for the message), which a
// caller would read as "someone else stored it".
func (b *inProcessBackoff) wait(ctx context.Context, conflict error) error {
	b.d = min(max(2*b.d, 5*time.Millisecond), 100*time.Millisecond)
	t := time.NewTimer(b.d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return fmt.Errorf("no outcome before the deadline, another write of it still in process (%v): %w", conflict, ctx.Err())
	case <-t.C:
		return nil
	}
}

// recordKey writes id's dedupe key, unless an unexpired one is there, and
// reports whether it wrote it.
func (s *Store) recordKey(ctx context.Context, obj *objects, id store.ID, expiry, now time.Time) (bool, error) {
	key := id.String()
	ttl := ttlFor(expiry, s.cfg.Now())
	var b inProcessBackoff
	for tries := 0; tries < 3; {
		err := unanswered(ctx, func(ctx context.Context) error {
			_, err := obj.keys.Create(ctx, key, encodeExpiry(expiry), jetstream.KeyTTL(ttl))
			return err
		})
		if err == nil {
			return true, nil
		}
		if inProcess(err) {
			// Another instance's key for this id is still being
			// proposed: it may yet fail, so it does not count yet.
			if err := b.wait(ctx, err); err != nil {
				return false, unavailable("recording dedupe key", err)
			}
			continue
		}
		tries++
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return false, unavailable("recording dedupe key", err)
		}
		var e jetstream.KeyValueEntry
		err = unanswered(ctx, func(ctx context.Context) (err error) {
			e, err = obj.keys.Get(ctx, key)
			return err
		})
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue // expired meanwhile
		}
		if err != nil {
			return false, unavailable("reading dedupe key", err)
		}
		if decodeExpiry(e.Value()).After(now) {
			return false, nil
		}
		// An expired key its TTL has not removed yet: replace it.
		_, err = s.kvWrite(ctx, s.n.keys, key, encodeExpiry(expiry), e.Revision(), ttl)
		if err == nil {
			return true, nil
		}
		if !isWrongLastSeq(err) {
			return false, unavailable("recording dedupe key", err)
		}
	}
	return false, nil
}

// Seen implements store.Store: a recorded key unexpired at now, or a
// delivery or dead letter of id still stored. Seen does not know the
// order keys of id's deliveries: when the cheap lookups find nothing, it
// looks for a delivery with any key, a filter that reads every pending
// subject of the stream (13 ms for 100,000 here).
func (s *Store) Seen(ctx context.Context, id store.ID, now time.Time) (bool, error) {
	obj, err := s.ready()
	if err != nil {
		return false, err
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	if found, err := s.stored(ctx, obj, id, now, nil); err != nil || found {
		return found, err
	}
	var m *rawMsg
	err = unanswered(ctx, func(ctx context.Context) (err error) {
		m, err = directFirst(ctx, s.nc, s.n.stream, s.n.stream+".d.*.*."+id.String())
		return err
	})
	if err != nil {
		return false, unavailable("looking up event", err)
	}
	return m != nil, nil
}

// stored reports whether id has a key unexpired at now, a delivery
// without an order key or on one of the subjects keyed, or a dead letter
// still stored: lookups at once.
func (s *Store) stored(ctx context.Context, obj *objects, id store.ID, now time.Time, keyed []string) (bool, error) {
	found := make([]bool, 3+len(keyed))
	errs := make([]error, 3+len(keyed))
	var wg sync.WaitGroup
	wg.Go(func() {
		var e jetstream.KeyValueEntry
		err := unanswered(ctx, func(ctx context.Context) (err error) {
			e, err = obj.keys.Get(ctx, id.String())
			return err
		})
		switch {
		case err == nil:
			found[0] = decodeExpiry(e.Value()).After(now)
		case !errors.Is(err, jetstream.ErrKeyNotFound):
			errs[0] = fmt.Errorf("reading dedupe key: %w", err)
		}
	})
	lookups := []struct{ stream, filter string }{
		{s.n.stream, s.n.stream + ".d.*." + id.String()},
		{s.n.dead, s.n.dead + ".*." + id.String()},
	}
	for _, subj := range keyed {
		lookups = append(lookups, struct{ stream, filter string }{s.n.stream, subj})
	}
	for i, f := range lookups {
		wg.Go(func() {
			var m *rawMsg
			err := unanswered(ctx, func(ctx context.Context) (err error) {
				m, err = directFirst(ctx, s.nc, f.stream, f.filter)
				return err
			})
			found[i+1], errs[i+1] = m != nil, err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return false, unavailable("looking up event", err)
	}
	return slices.Contains(found, true), nil
}

// ExpireKeys implements store.Store: the buckets' per-key TTLs expire
// keys and key states, so there is nothing to do.
func (s *Store) ExpireKeys(ctx context.Context, now time.Time) (int, error) {
	if _, err := s.ready(); errors.Is(err, store.ErrClosed) {
		return 0, err
	}
	return 0, nil
}
