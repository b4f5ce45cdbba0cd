package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

var (
	bucketMeta    = []byte("meta")    // id -> meta
	bucketBody    = []byte("body")    // id -> content type + body
	bucketKeys    = []byte("keys")    // id -> key expiry (unix ns)
	bucketKeyExp  = []byte("keyexp")  // expiry + id -> nil, to expire keys in order
	bucketPending = []byte("pending") // target -> ref -> delivery
	bucketDead    = []byte("dead")    // target -> ref -> delivery
)

// maxBatch bounds how many writes share one transaction (and one fsync).
const maxBatch = 1024

// Bolt is the durable store: one bbolt file. Writes from any number of
// goroutines are queued to one writer, which commits everything queued
// since its last commit in one transaction, so concurrent requests share an
// fsync without any added delay when the load is light.
type Bolt struct {
	db   *bolt.DB
	path string

	ops    chan *op
	mu     sync.RWMutex // excludes submit from Close
	closed bool
	quit   chan struct{}
	done   chan struct{}
}

type op struct {
	fn   func(*bolt.Tx) error
	done chan error
}

var opPool = sync.Pool{New: func() any { return &op{done: make(chan error, 1)} }}

// OpenBolt opens (creating if need be) the store file at path. It fails
// after timeout if another process holds the file: bbolt would otherwise
// wait forever.
func OpenBolt(path string, timeout time.Duration) (*Bolt, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating store directory: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:      timeout,
		FreelistType: bolt.FreelistMapType,
	})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("opening store %s: file is locked by another process (another Caddy using the same storage?): %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("opening store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketBody, bucketKeys, bucketKeyExp, bucketPending, bucketDead} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising store %s: %w", path, err)
	}
	s := &Bolt{
		db:   db,
		path: path,
		ops:  make(chan *op, maxBatch),
		quit: make(chan struct{}),
		done: make(chan struct{}),
	}
	go s.writer()
	return s, nil
}

// Path returns the file's path.
func (s *Bolt) Path() string { return s.path }

// Close waits for queued writes to commit, then closes the file.
func (s *Bolt) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.quit)
	s.mu.Unlock()
	<-s.done
	return s.db.Close()
}

// submit runs fn in the next group commit and returns once it is durable.
// fn may run twice (a second time alone, when another write of its batch
// failed), so it must set its results afresh on each run.
func (s *Bolt) submit(fn func(*bolt.Tx) error) error {
	o := opPool.Get().(*op)
	o.fn = fn
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		opPool.Put(o)
		return ErrClosed
	}
	s.ops <- o
	s.mu.RUnlock()
	err := <-o.done
	o.fn = nil
	opPool.Put(o)
	return err
}

func (s *Bolt) writer() {
	defer close(s.done)
	batch := make([]*op, 0, maxBatch)
	for {
		var first *op
		select {
		case first = <-s.ops:
		case <-s.quit:
			// No submit can send any more: commit what is queued.
			for {
				select {
				case o := <-s.ops:
					s.commit(append(batch[:0], o))
				default:
					return
				}
			}
		}
		batch = append(batch[:0], first)
	fill:
		for len(batch) < maxBatch {
			select {
			case o := <-s.ops:
				batch = append(batch, o)
			default:
				break fill
			}
		}
		s.commit(batch)
	}
}

type opError struct{ err error }

func (e opError) Error() string { return e.err.Error() }

func (s *Bolt) commit(batch []*op) {
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, o := range batch {
			if err := o.fn(tx); err != nil {
				return opError{err}
			}
		}
		return nil
	})
	var oe opError
	if errors.As(err, &oe) && len(batch) > 1 {
		// One write failed on its own account: give each its own
		// transaction so the others are not lost with it.
		for _, o := range batch {
			o.done <- s.db.Update(o.fn)
		}
		return
	}
	if errors.As(err, &oe) {
		err = oe.err
	}
	for _, o := range batch {
		o.done <- err
	}
}

func u64(t time.Time) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, uint64(t.UnixNano()))
	return b
}

func keyExpired(v []byte, now time.Time) bool {
	return len(v) != 8 || int64(binary.BigEndian.Uint64(v)) <= now.UnixNano()
}

// Accept implements Store.
func (s *Bolt) Accept(ev *Event, targets []string, keyExpiry, now time.Time) (bool, error) {
	var dup bool
	id := ev.ID
	err := s.submit(func(tx *bolt.Tx) error {
		dup = false
		keys := tx.Bucket(bucketKeys)
		metas := tx.Bucket(bucketMeta)
		if v := keys.Get(id[:]); v != nil && !keyExpired(v, now) {
			dup = true
			return nil
		}
		if metas.Get(id[:]) != nil {
			dup = true
			return nil
		}
		if !keyExpiry.IsZero() {
			exp := tx.Bucket(bucketKeyExp)
			if old := keys.Get(id[:]); len(old) == 8 {
				if err := exp.Delete(append(append([]byte{}, old...), id[:]...)); err != nil {
					return err
				}
			}
			e := u64(keyExpiry)
			if err := keys.Put(id[:], e); err != nil {
				return err
			}
			if err := exp.Put(append(e, id[:]...), nil); err != nil {
				return err
			}
		}
		if len(targets) == 0 {
			return nil
		}
		if err := metas.Put(id[:], meta{receivedAt: ev.ReceivedAt, owed: uint32(len(targets))}.encode()); err != nil {
			return err
		}
		if err := tx.Bucket(bucketBody).Put(id[:], encodeBody(ev)); err != nil {
			return err
		}
		ref := makeRef(ev.ReceivedAt, id)
		d := encodeDelivery(&Delivery{NextAt: now})
		pending := tx.Bucket(bucketPending)
		for _, t := range targets {
			b, err := pending.CreateBucketIfNotExists([]byte(t))
			if err != nil {
				return err
			}
			if err := b.Put(ref, d); err != nil {
				return err
			}
		}
		return nil
	})
	return dup, err
}

// Seen implements Store.
func (s *Bolt) Seen(id ID, now time.Time) (bool, error) {
	var seen bool
	err := s.view(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketKeys).Get(id[:]); v != nil && !keyExpired(v, now) {
			seen = true
			return nil
		}
		seen = tx.Bucket(bucketMeta).Get(id[:]) != nil
		return nil
	})
	return seen, err
}

func (s *Bolt) view(fn func(*bolt.Tx) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return ErrClosed
	}
	return s.db.View(fn)
}

// Event implements Store.
func (s *Bolt) Event(id ID) (*Event, error) {
	var ev *Event
	err := s.view(func(tx *bolt.Tx) error {
		var err error
		ev, err = getEvent(tx, id)
		return err
	})
	return ev, err
}

func getEvent(tx *bolt.Tx, id ID) (*Event, error) {
	mv := tx.Bucket(bucketMeta).Get(id[:])
	bv := tx.Bucket(bucketBody).Get(id[:])
	if mv == nil || bv == nil {
		return nil, ErrNotFound
	}
	m, err := decodeMeta(mv)
	if err != nil {
		return nil, err
	}
	ctype, body, err := decodeBody(bv)
	if err != nil {
		return nil, err
	}
	return &Event{ID: id, ReceivedAt: m.receivedAt, ContentType: ctype, Body: body}, nil
}

// putMeta writes m back, or deletes the event once nothing references it.
func putMeta(tx *bolt.Tx, id ID, m meta) error {
	if m.owed == 0 && m.dead == 0 {
		if err := tx.Bucket(bucketMeta).Delete(id[:]); err != nil {
			return err
		}
		return tx.Bucket(bucketBody).Delete(id[:])
	}
	return tx.Bucket(bucketMeta).Put(id[:], m.encode())
}

// Settle implements Store.
func (s *Bolt) Settle(d *Delivery, o Outcome) (Change, error) {
	var ch Change
	err := s.submit(func(tx *bolt.Tx) error {
		ch = Change{}
		mv := tx.Bucket(bucketMeta).Get(d.ID[:])
		if mv == nil {
			return nil
		}
		m, err := decodeMeta(mv)
		if err != nil {
			return err
		}
		ref := makeRef(m.receivedAt, d.ID)
		target := []byte(d.Target)
		pb := tx.Bucket(bucketPending).Bucket(target)
		db := tx.Bucket(bucketDead).Bucket(target)
		inPending := pb != nil && pb.Get(ref) != nil
		inDead := db != nil && db.Get(ref) != nil
		owed := m.owed
		switch o {
		case Retry:
			if !inPending {
				return nil
			}
			return pb.Put(ref, encodeDelivery(d))
		case Dead:
			if !inPending {
				return nil
			}
			if err := pb.Delete(ref); err != nil {
				return err
			}
			db, err := tx.Bucket(bucketDead).CreateBucketIfNotExists(target)
			if err != nil {
				return err
			}
			if err := db.Put(ref, encodeDelivery(d)); err != nil {
				return err
			}
			m.owed--
			m.dead++
			ch.Pending, ch.Dead = -1, 1
		case Delivered:
			if inPending {
				if err := pb.Delete(ref); err != nil {
					return err
				}
				m.owed--
				ch.Pending = -1
			}
			if inDead {
				if err := db.Delete(ref); err != nil {
					return err
				}
				m.dead--
				ch.Dead = -1
			}
		}
		if owed > 0 && m.owed == 0 {
			ch.PendingEvents = -1
		}
		return putMeta(tx, d.ID, m)
	})
	if err != nil {
		return Change{}, err
	}
	return ch, nil
}

// Pending implements Store.
func (s *Bolt) Pending(fn func(d *Delivery) error) error {
	return s.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPending).ForEachBucket(func(target []byte) error {
			t := string(target)
			return tx.Bucket(bucketPending).Bucket(target).ForEach(func(k, v []byte) error {
				d, err := decodeDelivery(t, k, v)
				if err != nil {
					return err
				}
				return fn(d)
			})
		})
	})
}

// OldestPending implements Store.
func (s *Bolt) OldestPending(target string) (time.Time, bool, error) {
	var t time.Time
	var ok bool
	err := s.view(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketPending).Bucket([]byte(target))
		if b == nil {
			return nil
		}
		k, _ := b.Cursor().First()
		if k == nil {
			return nil
		}
		at, _, err := parseRef(k)
		t, ok = at, err == nil
		return err
	})
	return t, ok, err
}

// KillTarget implements Store.
func (s *Bolt) KillTarget(target, reason string, now time.Time) (int, int, error) {
	var n, settled int
	err := s.submit(func(tx *bolt.Tx) error {
		n, settled = 0, 0
		name := []byte(target)
		pb := tx.Bucket(bucketPending).Bucket(name)
		if pb == nil {
			return nil
		}
		db, err := tx.Bucket(bucketDead).CreateBucketIfNotExists(name)
		if err != nil {
			return err
		}
		err = pb.ForEach(func(k, v []byte) error {
			d, err := decodeDelivery(target, k, v)
			if err != nil {
				return err
			}
			d.LastError = reason
			if d.LastAttemptAt.IsZero() {
				d.LastAttemptAt = now
			}
			if err := db.Put(append([]byte{}, k...), encodeDelivery(d)); err != nil {
				return err
			}
			mv := tx.Bucket(bucketMeta).Get(d.ID[:])
			if mv == nil {
				return nil
			}
			m, err := decodeMeta(mv)
			if err != nil {
				return err
			}
			if m.owed > 0 {
				m.owed--
				if m.owed == 0 {
					settled++
				}
			}
			m.dead++
			n++
			return putMeta(tx, d.ID, m)
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bucketPending).DeleteBucket(name)
	})
	return n, settled, err
}

// DeadLetters implements Store.
func (s *Bolt) DeadLetters(target, cursor string, limit int) ([]DeadLetter, string, error) {
	var fromTarget string
	var fromRef []byte
	if cursor != "" {
		var err error
		if fromTarget, fromRef, err = decodeCursor(cursor); err != nil {
			return nil, "", err
		}
	}
	if limit <= 0 {
		limit = 100
	}
	var list []DeadLetter
	var next string
	err := s.view(func(tx *bolt.Tx) error {
		var names []string
		dead := tx.Bucket(bucketDead)
		if target != "" {
			names = []string{target}
		} else {
			_ = dead.ForEachBucket(func(k []byte) error { names = append(names, string(k)); return nil })
		}
		for _, t := range names {
			if fromTarget != "" && t < fromTarget {
				continue
			}
			b := dead.Bucket([]byte(t))
			if b == nil {
				continue
			}
			c := b.Cursor()
			var k, v []byte
			if t == fromTarget && fromRef != nil {
				k, v = c.Seek(fromRef)
				if k != nil && bytes.Equal(k, fromRef) {
					k, v = c.Next()
				}
			} else {
				k, v = c.First()
			}
			for ; k != nil; k, v = c.Next() {
				if len(list) == limit {
					next = encodeCursor(list[len(list)-1].Target, makeRef(list[len(list)-1].ReceivedAt, list[len(list)-1].ID))
					return nil
				}
				d, err := decodeDelivery(t, k, v)
				if err != nil {
					return err
				}
				dl := DeadLetter{Delivery: *d}
				if bv := tx.Bucket(bucketBody).Get(d.ID[:]); bv != nil {
					if dl.ContentType, dl.Body, err = decodeBody(bv); err != nil {
						return err
					}
				}
				list = append(list, dl)
			}
		}
		return nil
	})
	return list, next, err
}

// Replay implements Store.
func (s *Bolt) Replay(ids []ID, target string, keep func(string) bool, now time.Time) ([]Delivery, int, error) {
	var out []Delivery
	var revived int
	err := s.submit(func(tx *bolt.Tx) error {
		out, revived = out[:0], 0
		dead := tx.Bucket(bucketDead)
		var names []string
		_ = dead.ForEachBucket(func(k []byte) error { names = append(names, string(k)); return nil })
		for _, t := range names {
			if (target != "" && t != target) || (keep != nil && !keep(t)) {
				continue
			}
			db := dead.Bucket([]byte(t))
			var refs [][]byte
			if len(ids) == 0 {
				_ = db.ForEach(func(k, _ []byte) error { refs = append(refs, append([]byte{}, k...)); return nil })
			} else {
				for _, id := range ids {
					mv := tx.Bucket(bucketMeta).Get(id[:])
					if mv == nil {
						continue
					}
					m, err := decodeMeta(mv)
					if err != nil {
						return err
					}
					if ref := makeRef(m.receivedAt, id); db.Get(ref) != nil {
						refs = append(refs, ref)
					}
				}
			}
			if len(refs) == 0 {
				continue
			}
			pb, err := tx.Bucket(bucketPending).CreateBucketIfNotExists([]byte(t))
			if err != nil {
				return err
			}
			for _, ref := range refs {
				at, id, err := parseRef(ref)
				if err != nil {
					return err
				}
				d := Delivery{ID: id, Target: t, ReceivedAt: at, NextAt: now}
				if err := db.Delete(ref); err != nil {
					return err
				}
				if err := pb.Put(ref, encodeDelivery(&d)); err != nil {
					return err
				}
				m, err := decodeMeta(tx.Bucket(bucketMeta).Get(id[:]))
				if err != nil {
					return err
				}
				if m.owed == 0 {
					revived++
				}
				m.owed++
				m.dead--
				if err := putMeta(tx, id, m); err != nil {
					return err
				}
				out = append(out, d)
			}
		}
		return nil
	})
	return out, revived, err
}

// DeleteDead implements Store.
func (s *Bolt) DeleteDead(id ID, target string) (map[string]int, error) {
	var n map[string]int
	err := s.submit(func(tx *bolt.Tx) error {
		n = map[string]int{}
		mv := tx.Bucket(bucketMeta).Get(id[:])
		if mv == nil {
			return nil
		}
		m, err := decodeMeta(mv)
		if err != nil {
			return err
		}
		ref := makeRef(m.receivedAt, id)
		dead := tx.Bucket(bucketDead)
		err = dead.ForEachBucket(func(name []byte) error {
			if target != "" && string(name) != target {
				return nil
			}
			b := dead.Bucket(name)
			if b.Get(ref) == nil {
				return nil
			}
			n[string(name)]++
			m.dead--
			return b.Delete(ref)
		})
		if err != nil {
			return err
		}
		return putMeta(tx, id, m)
	})
	return n, err
}

// ExpireKeys implements Store. It works in slices so that a large sweep
// does not hold up the acks queued behind it.
func (s *Bolt) ExpireKeys(now time.Time) (int, error) {
	total := 0
	for {
		var n int
		var more bool
		err := s.submit(func(tx *bolt.Tx) error {
			n, more = 0, false
			exp := tx.Bucket(bucketKeyExp)
			keys := tx.Bucket(bucketKeys)
			c := exp.Cursor()
			for k, _ := c.First(); k != nil; k, _ = c.First() {
				if len(k) != 8+len(ID{}) || int64(binary.BigEndian.Uint64(k)) > now.UnixNano() {
					return nil
				}
				if n == 5000 {
					more = true
					return nil
				}
				id := k[8:]
				if v := keys.Get(id); v != nil && bytes.Equal(v, k[:8]) {
					if err := keys.Delete(id); err != nil {
						return err
					}
				}
				if err := c.Delete(); err != nil {
					return err
				}
				n++
			}
			return nil
		})
		total += n
		if err != nil || !more {
			return total, err
		}
	}
}

// Stats implements Store.
func (s *Bolt) Stats(now time.Time) (Stats, error) {
	st := Stats{Pending: map[string]int{}, Dead: map[string]int{}}
	err := s.view(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketMeta).ForEach(func(_, v []byte) error {
			m, err := decodeMeta(v)
			if err != nil {
				return err
			}
			if m.owed > 0 {
				st.PendingEvents++
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, top := range []struct {
			name []byte
			into map[string]int
		}{{bucketPending, st.Pending}, {bucketDead, st.Dead}} {
			b := tx.Bucket(top.name)
			err := b.ForEachBucket(func(k []byte) error {
				if n := b.Bucket(k).Stats().KeyN; n > 0 {
					top.into[string(k)] = n
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		st.Keys = tx.Bucket(bucketKeys).Stats().KeyN
		return nil
	})
	return st, err
}

// sortedKeys is shared by both stores for stable listings.
func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

var _ Store = (*Bolt)(nil)
