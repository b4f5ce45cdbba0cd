package natsstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// walkBatch is how many dead letters one direct get reads while a replay
// walks them.
const walkBatch = 256

// deadFilterFor is the subject filter of the dead letters of id (every
// event if zero) at target (every target if "").
func (s *Store) deadFilterFor(id *store.ID, target string) string {
	tok, ev := "*", "*"
	if target != "" {
		tok = token(target)
	}
	if id != nil {
		ev = id.String()
	}
	if tok == "*" && ev == "*" {
		return s.n.dead + ".>"
	}
	return s.n.dead + "." + tok + "." + ev
}

func decodeDead(m rawMsg) (store.DeadLetter, error) {
	target, _, id, err := splitSubject(m.subject)
	if err != nil {
		return store.DeadLetter{}, err
	}
	dl := store.DeadLetter{
		Delivery:    store.Delivery{ID: id, Target: target, ReceivedAt: receivedAt(m.header)},
		ContentType: m.header.Get(hdrContentType),
		Body:        m.data,
	}
	if rec := m.header.Get(hdrDelivery); rec != "" {
		if err := decodeRecord([]byte(rec), &dl.Delivery); err != nil {
			return dl, fmt.Errorf("dead letter %s: %w", m.subject, err)
		}
	}
	return dl, nil
}

// DeadLetters implements store.Store. They come in the dead-letter
// stream's order (when each was written); the cursor is the stream
// sequence of the last one listed.
func (s *Store) DeadLetters(ctx context.Context, target, cursor string, limit int) ([]store.DeadLetter, string, error) {
	if _, err := s.ready(); err != nil {
		return nil, "", err
	}
	limit = store.ListLimit(limit)
	from, err := pageStart(cursor)
	if err != nil {
		return nil, "", err
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	msgs, left, err := directBatch(ctx, s.nc, s.n.dead, s.deadFilterFor(nil, target), from, limit)
	if err != nil {
		return nil, "", unavailable("listing dead letters", err)
	}
	list := make([]store.DeadLetter, 0, len(msgs))
	for _, m := range msgs {
		dl, err := decodeDead(m)
		if err != nil {
			return nil, "", err
		}
		list = append(list, dl)
	}
	next := ""
	if left > 0 && len(msgs) > 0 {
		next = strconv.FormatUint(msgs[len(msgs)-1].seq, 10)
	}
	return list, next, nil
}

// Replay implements store.Store. Each dead letter becomes a new delivery
// message with the message id <event>.<target>.r<dead letter sequence>,
// with the order key it had, published only if the pair has no delivery
// pending on that subject (see pendingSubject), and is then purged up to
// its own sequence: a retried replay stores nothing twice, and a dead
// letter written again meanwhile stays. They are replayed oldest receipt
// first, so that they are taken (and counted in OldestPending) in that
// order; a replay with an order key is the last of its key, behind what
// is pending.
func (s *Store) Replay(ctx context.Context, ids []store.ID, target string, keep func(target string) bool) (int, error) {
	obj, err := s.ready()
	if err != nil {
		return 0, err
	}
	var filters []string
	if len(ids) == 0 {
		filters = []string{s.deadFilterFor(nil, target)}
	}
	for i := range ids {
		filters = append(filters, s.deadFilterFor(&ids[i], target))
	}
	type ref struct {
		seq uint64
		at  time.Time
		id  store.ID
		tgt string
	}
	var refs []ref
	seen := map[uint64]bool{}
	for _, f := range filters {
		var from uint64
		for {
			c, cancel := s.bounded(ctx)
			msgs, left, err := directBatch(c, s.nc, s.n.dead, f, from, walkBatch)
			cancel()
			if err != nil {
				return 0, unavailable("reading dead letters", err)
			}
			for _, m := range msgs {
				tgt, _, id, err := splitSubject(m.subject)
				if err != nil || seen[m.seq] || keep != nil && !keep(tgt) {
					continue
				}
				seen[m.seq] = true
				refs = append(refs, ref{m.seq, receivedAt(m.header), id, tgt})
			}
			if left == 0 || len(msgs) == 0 {
				break
			}
			from = msgs[len(msgs)-1].seq + 1
		}
	}
	slices.SortFunc(refs, func(a, b ref) int {
		if c := a.at.Compare(b.at); c != 0 {
			return c
		}
		return cmp.Compare(a.seq, b.seq)
	})
	n := 0
	for _, r := range refs {
		c, cancel := s.bounded(ctx)
		m, err := obj.dead.GetMsg(c, r.seq)
		cancel()
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // replayed or deleted meanwhile
		}
		if err != nil {
			return n, unavailable("reading dead letter", err)
		}
		dl, err := decodeDead(rawMsg{subject: m.Subject, seq: m.Sequence, header: m.Header, data: m.Data})
		if err != nil {
			return n, err
		}
		moved, err := s.replayOne(ctx, obj, dl, r.seq)
		if err != nil {
			return n, err
		}
		n += moved
	}
	if n > 0 {
		s.counts.touch()
	}
	return n, nil
}

func (s *Store) replayOne(ctx context.Context, obj *objects, dl store.DeadLetter, seq uint64) (int, error) {
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	tok := token(dl.Target)
	// A replay starts with no attempts made.
	if err := obj.attempts.Purge(ctx, attemptKey(tok, dl.ID), jetstream.PurgeTTL(markerTTL)); err != nil {
		return 0, unavailable("resetting attempts", err)
	}
	ev := &store.Event{ID: dl.ID, ReceivedAt: dl.ReceivedAt, ContentType: dl.ContentType, Body: dl.Body}
	msgID := dl.ID.String() + "." + tok + ".r" + strconv.FormatUint(seq, 10)
	if _, err := s.publishDelivery(ctx, ev, tok, dl.OrderKey, msgID); err != nil {
		return 0, unavailable("replaying dead letter", err)
	}
	moved, err := purge(ctx, s.nc, s.n.dead, s.n.deadSubject(tok, dl.ID), seq+1)
	if err != nil {
		return 0, unavailable("replaying dead letter", err)
	}
	return moved, nil
}

// DeleteDead implements store.Store. The event is in its messages alone,
// so nothing else is left to delete.
func (s *Store) DeleteDead(ctx context.Context, id store.ID, target string) (int, error) {
	if _, err := s.ready(); err != nil {
		return 0, err
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	n, err := purge(ctx, s.nc, s.n.dead, s.deadFilterFor(&id, target), 0)
	if err != nil {
		return 0, unavailable("deleting dead letters", err)
	}
	if n > 0 {
		s.counts.touch()
	}
	return n, nil
}
