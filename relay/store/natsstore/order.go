package natsstore

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// Per-key order (store.QueueOptions.Ordered) without a dispatcher. A
// delivery with an order key is stored on S.d.<target>.<key token>.<event
// id>, so that the deliveries of one key at a target are the messages on
// one subject filter, in stream order: the order they were accepted (a
// replay is published again, behind them). A delivery stays in the stream
// while it is leased, waits for a retry or is postponed, and leaves it
// only when it is delivered or dead-lettered. So the first message on its
// key's filter is the one delivery of the key that may be attempted (the
// head), and an ordered queue hands out a keyed delivery only while it is
// the head, which it asks the server (a direct get of the first message
// on the filter) when the consumer hands the delivery over. One that is
// not the head uses no attempt: it waits behind its key's head (parked, if
// the head is held by this instance, until it is settled here; else for
// orderBackoff, a few times in this instance and then back at the server)
// and is asked about again.
//
// The answer can be late, never early: a server (or a replica answering
// direct gets) that has not yet applied the removal of the head shows it
// still there, which only has the next one wait once more; a removal it
// shows is one the head's own settle made after its attempt ended.

const (
	// orderWaitMin is how long a delivery behind its key's head first
	// waits before it is looked at again; each look that finds it still
	// behind doubles the wait, up to orderWaitMax or a quarter of the
	// lease, whichever is less (see waitMax). Short first, as most heads
	// settle within an attempt; bounded, so that a delivery follows a head
	// that settles within that bound; long enough at the bound that what
	// waits behind slow heads costs the server little.
	orderWaitMin = 5 * time.Millisecond
	orderWaitMax = 2 * time.Second
	// orderWaitsHere is how many of those waits a delivery makes in the
	// instance that fetched it before it goes back to the server (whose
	// redelivery is two more messages).
	orderWaitsHere = 2
	// orderReadHead is after how many looks the queue reads the head's
	// attempt record too: a head waiting for a retry minutes off keeps
	// what is behind it away until then, instead of looking every
	// orderWaitMax.
	orderReadHead = 6
)

// keyToken turns an order key into one subject token: base64url of 16
// bytes of its SHA-256. Two keys that share a token are ordered as one,
// which holds one back but breaks no order.
func keyToken(key string) string {
	sum := sha256.Sum256([]byte(key))
	return base64.RawURLEncoding.EncodeToString(sum[:16])
}

// encodeOrderKey is an order key as a header value, decodeOrderKey the
// reverse.
func encodeOrderKey(key string) string { return strconv.QuoteToASCII(key) }

func decodeOrderKey(v string) string {
	if k, err := strconv.Unquote(v); err == nil {
		return k
	}
	return v
}

// heldKey is a keyed delivery this instance holds (being checked,
// readied, taken, under way): a later one of its key cannot be the head,
// which needs no question to the server.
type heldKey struct {
	seq uint64
	at  time.Time
}

// claim notes that l is held here and returns true, unless an earlier
// delivery of its key is: l is then not the head, and waits here for the
// earlier one to be released (parked: one a key, for at most a quarter
// of the lease, so that it does not lapse here) or goes back. A holding
// older than the lease is not trusted: it may have lapsed to another
// instance and been settled there.
func (q *queue) claim(l *lease) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.claimLocked(l)
}

func (q *queue) claimLocked(l *lease) bool {
	if h, ok := q.held[l.keyTok]; ok && h.seq < l.seq && time.Since(h.at) < q.lease {
		if p := q.parked[l.keyTok]; p == nil && !q.stopped {
			q.parked[l.keyTok] = l
		} else {
			_ = l.m.NakWithDelay(orderBackoff(l.looks(), q.waitMaxLocked()))
		}
		return false
	}
	q.held[l.keyTok] = heldKey{seq: l.seq, at: time.Now()}
	return true
}

// setOrderedLocked switches the queue's ordering. What was fetched under
// the other setting and is not handed out yet is looked at again: a
// delivery readied unordered may be behind the head of its key, and one
// parked behind its head may go now.
func (q *queue) setOrderedLocked(ordered bool) {
	if q.ordered == ordered {
		return
	}
	q.ordered = ordered
	if !ordered {
		for k, p := range q.parked {
			delete(q.parked, k)
			p.ordered = false
			q.askLocked(p)
		}
		return
	}
	keep := q.ready[:0]
	for _, l := range q.ready {
		if l.keyTok == "" {
			keep = append(keep, l)
			continue
		}
		l.ordered = true
		if q.claimLocked(l) {
			q.askLocked(l)
		}
	}
	clear(q.ready[len(keep):])
	q.ready = keep
}

// release notes that l is no longer held here (settled, postponed, put
// back), and has the delivery parked behind it, if any, checked at once:
// it is the head now if l was settled, and nothing else of its key came
// in between. releaseLocked with q.mu held.
func (q *queue) release(l *lease) {
	if !l.ordered {
		return
	}
	q.mu.Lock()
	q.releaseLocked(l)
	q.mu.Unlock()
}

func (q *queue) releaseLocked(l *lease) {
	if !l.ordered {
		return
	}
	if h, ok := q.held[l.keyTok]; !ok || h.seq != l.seq {
		return
	}
	delete(q.held, l.keyTok)
	p := q.parked[l.keyTok]
	if p == nil {
		return
	}
	delete(q.parked, l.keyTok)
	if q.stopped {
		_ = p.m.Nak()
		return
	}
	q.held[p.keyTok] = heldKey{seq: p.seq, at: time.Now()}
	q.askLocked(p)
}

// headWait returns 0 when l is the head of its key, else how long it is
// to wait before it is looked at again.
func (q *queue) headWait(ctx context.Context, obj *objects, l *lease) (time.Duration, error) {
	s := q.s
	var head *rawMsg
	err := unanswered(ctx, func(ctx context.Context) (err error) {
		head, err = directFirst(ctx, s.nc, s.n.stream, s.n.keyFilter(q.tok, l.keyTok))
		return err
	})
	switch {
	case err != nil:
		return 0, err
	case head != nil && head.seq == l.seq:
		return 0, nil
	}
	q.mu.Lock()
	limit := q.waitMaxLocked()
	q.mu.Unlock()
	wait := orderBackoff(l.looks(), limit)
	if head == nil || head.seq > l.seq {
		// Gone: settled by an instance it lapsed to. Or a replica that
		// has not caught up yet: look again soon.
		return wait, nil
	}
	if l.looks() >= orderReadHead {
		if _, _, id, err := splitSubject(head.subject); err == nil {
			// No record (or none readable): the head has made no
			// attempt yet, and the backoff alone decides.
			var d store.Delivery
			if e, err := obj.attempts.Get(ctx, attemptKey(q.tok, id)); err == nil && decodeRecord(e.Value(), &d) == nil {
				wait = max(wait, d.NextAt.Sub(s.cfg.Now())+orderWaitMin)
			}
		}
	}
	return wait, nil
}

// looks is how many times l was found behind the head of its key
// before, as far as its deliveries tell: the consumer's count of them, and
// the waits in this instance since the last.
func (l *lease) looks() int {
	return int(min(l.delivered-1, 64))*(orderWaitsHere+1) + l.waits
}

// waitMaxLocked bounds the backoff of what waits behind a head: a
// quarter of the lease at most, as a taker may hold the leases of heads
// while it waits for the next of another key to come.
func (q *queue) waitMaxLocked() time.Duration { return min(orderWaitMax, q.lease/4) }

// orderBackoff is how long a delivery found behind the head of its key
// after looks earlier looks waits, up to limit, with a little jitter so
// that what waits on many keys does not come back at once.
func orderBackoff(looks int, limit time.Duration) time.Duration {
	d := limit
	if looks < 20 {
		d = min(orderWaitMin<<looks, limit)
	}
	return d + rand.N(d/4+1)
}
