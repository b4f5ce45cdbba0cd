package natsstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// markerKeep is how long the keys bucket keeps the key written for a
// migrated event, expired or not: as long as it is there, another run
// skips the event instead of storing again deliveries the relay may have
// made meanwhile. Its stored expiry still decides when it stops counting
// as seen. The migrate command's help names it.
const markerKeep = 30 * 24 * time.Hour

// MigrateOptions configure Migrate.
type MigrateOptions struct {
	// DryRun counts what a run would copy, from the bbolt store alone:
	// nothing is written, and the target store (which may be nil) is not
	// consulted.
	DryRun bool
	// Now is the clock keys expire by; nil is the target store's.
	Now func() time.Time
	// Progress, if set, gets the counts so far after each delivery, dead
	// letter and key copied or found there, and after each event skipped
	// whole, from Migrate's goroutine.
	Progress func(MigrateSummary)
}

// MigrateSummary counts what Migrate copied, and what it found already
// there (copied by an earlier run, or known to the relay on NATS).
type MigrateSummary struct {
	Pending, PendingSkipped int
	Dead, DeadSkipped       int
	Keys, KeysSkipped       int
	// KeysExpired are the keys that expired before they could be copied.
	KeysExpired int
}

// Migrate copies a bbolt store into the stream of to: each pending
// delivery with its attempts and schedule, each dead letter, each
// unexpired dedupe key with its expiry. The bbolt store must be one no
// relay uses (store.OpenBoltExisting), and is not changed. An error ends the
// run with the counts so far; running it again, after an error or
// interruption or days later, copies what is missing and nothing twice.
//
// Idempotence rests on the natural ids, not on the stream's Nats-Msg-Id
// window, and goes event by event, oldest first:
//
//   - a pending delivery is published to its (target, event) subject
//     (with its order key, if any: see pendingSubject), expecting no
//     message there yet: one already there is skipped. One
//     with attempts gets its attempt record first, and the record in its
//     Relay-Delivery header too, so that no taker counts its attempts from
//     zero; its record is only written while its subject is empty, so a
//     record the relay has updated since an earlier run stays;
//   - a dead letter is published to its (target, event) subject in the
//     dead-letter stream, expecting none there yet, its order key in its
//     record;
//   - last, the event's key: its own, with its expiry, when it has one
//     unexpired; else a key whose stored expiry is already past, which no
//     relay counts as seen (the stored expiry decides) and which intake
//     replaces should the event come again. Either is kept by the bucket
//     for markerKeep at least.
//
// An event whose key is in the bucket is skipped whole: an earlier run
// copied it, and the relay may have delivered, replayed or deleted what it
// copied since; or the relay on NATS accepted the event itself and has it.
// So a delivery made from NATS between two runs is not stored again, for
// events with a key and without one alike. What is left is the event a
// run was copying when it stopped: a delivery of it that the relay made
// before the next run (and more than the stream's Duplicates window
// before) is stored and made again. At least once, as ever; targets get
// the event id to dedupe by. A run more than markerKeep after the one
// that copied an event copies it again.
func Migrate(ctx context.Context, from *store.Bolt, to *Store, opts MigrateOptions) (MigrateSummary, error) {
	m := &migration{to: to, opts: opts, now: opts.Now}
	if from == nil {
		return m.sum, errors.New("migrate needs a bbolt store to copy")
	}
	if to == nil && !opts.DryRun {
		return m.sum, errors.New("migrate needs a nats store to copy into")
	}
	if m.now == nil {
		m.now = time.Now
		if to != nil {
			m.now = to.cfg.Now
		}
	}
	if !opts.DryRun {
		if _, err := to.ready(); err != nil {
			return m.sum, fmt.Errorf("nats store: %w", err)
		}
	}
	err := from.Events(func(e *store.StoredEvent) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := m.event(ctx, e); err != nil {
			return fmt.Errorf("event %s: %w", e.ID, err)
		}
		return nil
	})
	if err != nil {
		return m.sum, fmt.Errorf("copying events: %w", err)
	}
	err = from.Keys(func(id store.ID, expiry time.Time) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := m.key(ctx, id, expiry); err != nil {
			return fmt.Errorf("key %s: %w", id, err)
		}
		return nil
	})
	if err != nil {
		return m.sum, fmt.Errorf("copying dedupe keys: %w", err)
	}
	return m.sum, nil
}

type migration struct {
	to   *Store
	opts MigrateOptions
	now  func() time.Time
	sum  MigrateSummary
}

func (m *migration) progress() {
	if m.opts.Progress != nil {
		m.opts.Progress(m.sum)
	}
}

// event copies one stored event, its key last (see Migrate).
func (m *migration) event(ctx context.Context, e *store.StoredEvent) error {
	now := m.now()
	live := !e.KeyExpiry.IsZero() && e.KeyExpiry.After(now)
	if !e.KeyExpiry.IsZero() && !live {
		m.sum.KeysExpired++
	}
	if m.opts.DryRun {
		m.sum.Pending += len(e.Pending)
		m.sum.Dead += len(e.Dead)
		if live {
			m.sum.Keys++
		}
		m.progress()
		return nil
	}
	obj, err := m.to.ready()
	if err != nil {
		return err
	}
	key := e.ID.String()
	c, cancel := m.to.bounded(ctx)
	_, err = obj.keys.Get(c, key)
	cancel()
	switch {
	case err == nil:
		m.sum.PendingSkipped += len(e.Pending)
		m.sum.DeadSkipped += len(e.Dead)
		if live {
			m.sum.KeysSkipped++
		}
		m.progress()
		return nil
	case !errors.Is(err, jetstream.ErrKeyNotFound):
		return unavailable("reading dedupe key", err)
	}
	for i := range e.Pending {
		copied, err := m.pending(ctx, obj, e, &e.Pending[i])
		if err != nil {
			return err
		}
		if copied {
			m.sum.Pending++
		} else {
			m.sum.PendingSkipped++
		}
		m.progress()
	}
	for i := range e.Dead {
		copied, err := m.dead(ctx, e, &e.Dead[i])
		if err != nil {
			return err
		}
		if copied {
			m.sum.Dead++
		} else {
			m.sum.DeadSkipped++
		}
		m.progress()
	}
	expiry := e.KeyExpiry
	if !live {
		// Past, so that no relay counts it as seen: it only marks the
		// event as copied.
		expiry = e.ReceivedAt
		if expiry.After(now) {
			expiry = now
		}
	}
	ttl := max(ttlFor(expiry, now), markerKeep)
	c, cancel = m.to.bounded(ctx)
	_, err = obj.keys.Create(c, key, encodeExpiry(expiry), jetstream.KeyTTL(ttl))
	cancel()
	switch {
	case err == nil:
		if live {
			m.sum.Keys++
		}
	case errors.Is(err, jetstream.ErrKeyExists):
		// The relay on NATS accepted the event meanwhile.
		if live {
			m.sum.KeysSkipped++
		}
	default:
		return unavailable("recording dedupe key", err)
	}
	if live {
		m.progress()
	}
	return nil
}

// hasState reports whether a pending delivery has anything besides its
// event to carry over: an attempt made, or an attempt due later.
func hasState(d *store.Delivery, now time.Time) bool {
	return d.Attempts > 0 || !d.FirstAttemptAt.IsZero() || !d.LastAttemptAt.IsZero() ||
		d.LastStatus != 0 || d.LastError != "" || d.NextAt.After(now)
}

// pending stores one pending delivery, unless its subject holds one, and
// reports whether it stored it.
func (m *migration) pending(ctx context.Context, obj *objects, e *store.StoredEvent, d *store.Delivery) (bool, error) {
	s := m.to
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	tok, keyTok := token(d.Target), ""
	if d.OrderKey != "" {
		keyTok = keyToken(d.OrderKey)
	}
	msg := eventMsg(s.n.pendingSubject(tok, keyTok, e.ID), e)
	if d.OrderKey != "" {
		msg.Header.Set(hdrOrderKey, encodeOrderKey(d.OrderKey))
	}
	if now := m.now(); hasState(d, now) {
		// Not over a record the relay keeps for a delivery already
		// there: it may have made attempts since.
		there, err := directFirst(ctx, s.nc, s.n.stream, msg.Subject)
		if err != nil {
			return false, unavailable("looking up delivery", err)
		}
		if there != nil {
			return false, nil
		}
		rec := encodeRecord(d)
		ttl := (max(d.NextAt.Sub(now), 0) + recordKeep).Truncate(time.Second)
		if err := s.kvPut(ctx, s.n.attempts, attemptKey(tok, e.ID), rec, ttl); err != nil {
			return false, unavailable("recording attempts", err)
		}
		// Tells the queue that this delivery has a record although its
		// first delivery is to come (queue.prepare), and what it holds.
		msg.Header.Set(hdrDelivery, string(rec))
	}
	// The message id adds nothing to the subject check but for a run
	// soon after one that stopped: it keeps a delivery the relay made
	// within the window from being stored again.
	return m.publish(ctx, msg, jetstream.WithMsgID(e.ID.String()+"."+tok+".m"))
}

// dead stores one dead letter, unless its subject holds one, and reports
// whether it stored it.
func (m *migration) dead(ctx context.Context, e *store.StoredEvent, d *store.Delivery) (bool, error) {
	s := m.to
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	msg := eventMsg(s.n.deadSubject(token(d.Target), e.ID), e)
	msg.Header.Set(hdrDelivery, string(encodeRecord(d)))
	return m.publish(ctx, msg)
}

// eventMsg is a message of e's body on subject, with the headers every
// delivery and dead letter carries.
func eventMsg(subject string, e *store.StoredEvent) *nats.Msg {
	msg := nats.NewMsg(subject)
	msg.Header.Set(hdrReceivedAt, strconv.FormatInt(e.ReceivedAt.UnixNano(), 10))
	if e.ContentType != "" {
		msg.Header.Set(hdrContentType, e.ContentType)
	}
	msg.Data = e.Body
	return msg
}

// publish stores msg if its subject holds no message, and reports whether
// it did.
func (m *migration) publish(ctx context.Context, msg *nats.Msg, opts ...jetstream.PublishOpt) (bool, error) {
	opts = append(opts, jetstream.WithExpectLastSequencePerSubject(0))
	ack, err := m.to.publish(ctx, msg, opts...) // retries a clustered stream's "still in process"
	switch {
	case isWrongLastSeq(err):
		return false, nil
	case err != nil:
		return false, unavailable("publishing to "+msg.Subject, err)
	}
	return !ack.Duplicate, nil
}

// key copies the dedupe key of an event the bbolt store no longer holds.
func (m *migration) key(ctx context.Context, id store.ID, expiry time.Time) error {
	now := m.now()
	switch {
	case !expiry.After(now):
		m.sum.KeysExpired++
	case m.opts.DryRun:
		m.sum.Keys++
	default:
		obj, err := m.to.ready()
		if err != nil {
			return err
		}
		ctx, cancel := m.to.bounded(ctx)
		defer cancel()
		created, err := m.to.recordKey(ctx, obj, id, expiry, now)
		if err != nil {
			return err
		}
		if created {
			m.sum.Keys++
		} else {
			m.sum.KeysSkipped++
		}
	}
	m.progress()
	return nil
}
