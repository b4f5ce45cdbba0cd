package natsstore

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// stateKey is the bucket key of (space, key): its base64url bytes, or for
// a long key (a subject has a bounded length) "=" and its SHA-256, which
// base64url without padding never starts with.
func stateKey(space, key string) string {
	raw := space + "\x00" + key
	if len(raw) <= 192 {
		return base64.RawURLEncoding.EncodeToString([]byte(raw))
	}
	sum := sha256.Sum256([]byte(raw))
	return "=" + hex.EncodeToString(sum[:])
}

// State implements store.Store. A record holds its expiry before its
// value: the bucket's TTL removes it a little later (keyMargin).
func (s *Store) State(ctx context.Context, space, key string, now time.Time) ([]byte, uint64, error) {
	obj, err := s.ready()
	if err != nil {
		return nil, 0, err
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	e, err := obj.keyStates.Get(ctx, stateKey(space, key))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, store.ErrNotFound
	}
	if err != nil {
		return nil, 0, unavailable("reading key state", err)
	}
	v := e.Value()
	if len(v) < 8 || !decodeExpiry(v).After(now) {
		return nil, 0, store.ErrNotFound
	}
	return append([]byte(nil), v[8:]...), e.Revision(), nil
}

// SetState implements store.Store. Revision 0 writes over nothing, a
// delete marker, or a record that has expired but is still in the
// bucket.
func (s *Store) SetState(ctx context.Context, space, key string, value []byte, rev uint64, expiry time.Time) (uint64, error) {
	obj, err := s.ready()
	if err != nil {
		return 0, err
	}
	ctx, cancel := s.bounded(ctx)
	defer cancel()
	k := stateKey(space, key)
	v := append(encodeExpiry(expiry), value...)
	now := s.cfg.Now()
	ttl := ttlFor(expiry, now)
	for range 3 {
		nrev, err := s.kvWrite(ctx, s.n.stat, k, v, rev, ttl)
		if err == nil {
			return nrev, nil
		}
		if !isWrongLastSeq(err) {
			return 0, unavailable("writing key state", err)
		}
		if rev != 0 {
			return 0, store.ErrConflict
		}
		last, err := obj.stateStream.GetLastMsgForSubject(ctx, "$KV."+s.n.stat+"."+k)
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
			continue // removed meanwhile
		case err != nil:
			return 0, unavailable("reading key state", err)
		}
		marker := last.Header.Get("KV-Operation") != "" || last.Header.Get(jetstream.MarkerReasonHeader) != ""
		if !marker && decodeExpiry(last.Data).After(now) {
			return 0, store.ErrConflict
		}
		rev = last.Sequence
		nrev, err = s.kvWrite(ctx, s.n.stat, k, v, rev, ttl)
		if err == nil {
			return nrev, nil
		}
		if isWrongLastSeq(err) {
			return 0, store.ErrConflict
		}
		return 0, unavailable("writing key state", err)
	}
	return 0, store.ErrConflict
}
