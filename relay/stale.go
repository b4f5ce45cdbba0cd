package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"strconv"
	"time"

	"github.com/tidwall/gjson"
	"go.uber.org/zap"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// staleSpace holds, per target and drop_stale key, the time of the newest
// event delivered (unix ns, 8 bytes big-endian). Records expire with the
// dedupe ttl: an event older than that would be deduped anyway.
const staleSpace = "stale"

// staleMark is an event's place in its drop_stale key: ok is false for an
// event without a readable key or time, which is sent and recorded as
// nothing.
type staleMark struct {
	key string // the state key: target and key value
	at  int64  // unix ns
	ok  bool
}

// staleMarkOf reads an event's drop_stale key and time.
func staleMarkOf(target string, ds *DropStale, body []byte) staleMark {
	if ds == nil {
		return staleMark{}
	}
	k := orderKey(body, ds.KeyPath)
	if k == "" {
		return staleMark{}
	}
	ns, ok := eventTime(gjson.GetBytes(body, ds.TimePath))
	if !ok {
		return staleMark{}
	}
	// The target's name first, then a separator no target name holds.
	return staleMark{key: target + "\x00" + k, at: ns, ok: true}
}

// eventTime reads unix seconds (a number, or a string holding one) or an
// RFC 3339 string, as unix ns.
func eventTime(v gjson.Result) (int64, bool) {
	switch v.Type {
	case gjson.Number:
		return secondsToNanos(v.Float())
	case gjson.String:
		if f, err := strconv.ParseFloat(v.Str, 64); err == nil {
			return secondsToNanos(f)
		}
		t, err := time.Parse(time.RFC3339Nano, v.Str)
		if err != nil {
			return 0, false
		}
		return t.UnixNano(), true
	}
	return 0, false
}

func secondsToNanos(f float64) (int64, bool) {
	if math.IsNaN(f) || math.IsInf(f, 0) || math.Abs(f) > math.MaxInt64/1e9 {
		return 0, false
	}
	return int64(math.Round(f * 1e9)), true
}

// newestDelivered returns the time of the newest event delivered for
// m's key (0 and rev 0 when none is recorded).
func (e *Engine) newestDelivered(ctx context.Context, m staleMark) (int64, uint64, error) {
	v, rev, err := e.st.State(ctx, staleSpace, m.key, e.now())
	if errors.Is(err, store.ErrNotFound) {
		return 0, 0, nil
	}
	if err != nil || len(v) != 8 {
		return 0, rev, err
	}
	return int64(binary.BigEndian.Uint64(v)), rev, nil
}

// isStale reports whether an event is older than one already delivered
// for its key. A store that cannot answer makes it not stale: it is sent
// (at least once).
func (e *Engine) isStale(t *target, m staleMark) bool {
	if !m.ok {
		return false
	}
	ctx, cancel := context.WithTimeout(e.ctx, breakerWriteTimeout)
	defer cancel()
	newest, _, err := e.newestDelivered(ctx, m)
	if err != nil {
		if e.ctx.Err() == nil && e.logEvery(&e.staleLogged, 10*time.Second) {
			e.log.Warn("could not read the newest delivered time for drop_stale: sending",
				zap.String("target", t.name), zap.Error(err))
		}
		return false
	}
	return m.at < newest
}

// markDelivered records a delivered event's time for its key, if it is
// the newest, before the delivery is settled: the next event of the key
// is checked against it.
func (e *Engine) markDelivered(t *target, m staleMark, ttl time.Duration) {
	if !m.ok {
		return
	}
	ctx, cancel := context.WithTimeout(e.ctx, breakerWriteTimeout)
	defer cancel()
	var err error
	for range 10 {
		var newest int64
		var rev uint64
		if newest, rev, err = e.newestDelivered(ctx, m); err != nil {
			break
		}
		if m.at <= newest && rev != 0 {
			return
		}
		var buf [8]byte
		binary.BigEndian.PutUint64(buf[:], uint64(m.at))
		if _, err = e.st.SetState(ctx, staleSpace, m.key, buf[:], rev, e.now().Add(ttl)); !errors.Is(err, store.ErrConflict) {
			break
		}
	}
	if err != nil && e.ctx.Err() == nil && e.logEvery(&e.staleLogged, 10*time.Second) {
		e.log.Warn("could not record the newest delivered time for drop_stale: an older event of the key may still be sent",
			zap.String("target", t.name), zap.Error(err))
	}
}
