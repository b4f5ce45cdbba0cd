package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// What a tool needs to copy a Bolt file elsewhere (caddy webhook-relay
// migrate): the file a relay left, read whole, event by event.

// OpenBoltExisting opens the store file a relay left at path, for a tool:
// unlike OpenBolt it never creates one, and a file that another process
// holds fails after timeout (2 s if not above zero) with an error that
// says why.
func OpenBoltExisting(path string, timeout time.Duration) (*Bolt, error) {
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("no relay store at %s: a relay's storage directory holds its relay.db", path)
	} else if err != nil {
		return nil, fmt.Errorf("opening store: %w", err)
	}
	s, err := OpenBolt(path, BoltOptions{Timeout: timeout})
	if errors.Is(err, bolterrors.ErrTimeout) {
		// OpenBolt's own message names the file and the lock again.
		return nil, fmt.Errorf("%s is locked by another process: is a Caddy still using it? Stop it first (%w)", path, bolterrors.ErrTimeout)
	}
	return s, err
}

// StoredEvent is one event of a Bolt file with everything that refers to
// it.
type StoredEvent struct {
	Event
	// KeyExpiry is when the event's dedupe key expires, or expired; zero
	// when it has none.
	KeyExpiry time.Time
	// Pending are the deliveries still owed, Dead the dead-lettered ones,
	// each in target name order.
	Pending, Dead []Delivery
}

// Events calls fn for every event the file holds, oldest first, with its
// pending deliveries, dead letters and key. It walks one read
// transaction, so fn sees the file as it was when Events began; fn must
// not call the store, and an error from it ends the walk.
func (s *Bolt) Events(fn func(e *StoredEvent) error) error {
	return s.view(func(tx *bolt.Tx) error {
		type sub struct {
			target string
			b      *bolt.Bucket
		}
		subs := func(top *bolt.Bucket) []sub {
			var out []sub
			_ = top.ForEachBucket(func(k []byte) error {
				out = append(out, sub{string(k), top.Bucket(k)})
				return nil
			})
			return out
		}
		pending, dead := subs(tx.Bucket(bucketPending)), subs(tx.Bucket(bucketDead))
		c := tx.Bucket(bucketEvents).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			at, id, err := parseRef(k)
			if err != nil || len(v) < countsLen {
				return fmt.Errorf("event record %x: %w", k, errCorrupt)
			}
			ctype, body, err := decodeBody(v[countsLen:])
			if err != nil {
				return fmt.Errorf("event %s: %w", id, err)
			}
			e := &StoredEvent{Event: Event{ID: id, ReceivedAt: at, ContentType: ctype, Body: body}}
			if x, ok := getIndex(tx, id); ok && x.expiry != 0 && x.recv == at.UnixNano() {
				e.KeyExpiry = time.Unix(0, x.expiry)
			}
			for _, list := range []struct {
				subs []sub
				dst  *[]Delivery
			}{{pending, &e.Pending}, {dead, &e.Dead}} {
				for _, sb := range list.subs {
					dv := sb.b.Get(k)
					if dv == nil {
						continue
					}
					d, err := decodeDelivery(sb.target, k, dv)
					if err != nil {
						return fmt.Errorf("event %s at %s: %w", id, sb.target, err)
					}
					*list.dst = append(*list.dst, *d)
				}
			}
			if err := fn(e); err != nil {
				return err
			}
		}
		return nil
	})
}

// Keys calls fn for every dedupe key of an event the file no longer holds
// (Events gives the keys of those it holds), expired ones not yet swept
// included, in id order, in one read transaction as Events does.
func (s *Bolt) Keys(fn func(id ID, expiry time.Time) error) error {
	return s.view(func(tx *bolt.Tx) error {
		events := tx.Bucket(bucketEvents)
		c := tx.Bucket(bucketKeys).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if len(k) != len(ID{}) || len(v) != 16 {
				return fmt.Errorf("key record %x: %w", k, errCorrupt)
			}
			exp := int64(binary.BigEndian.Uint64(v))
			if exp == 0 {
				continue // the index of a stored event, not a key
			}
			var id ID
			copy(id[:], k)
			if events.Get(refAt(int64(binary.BigEndian.Uint64(v[8:])), id)) != nil {
				continue
			}
			if err := fn(id, time.Unix(0, exp)); err != nil {
				return err
			}
		}
		return nil
	})
}
