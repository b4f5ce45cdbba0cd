package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// The layout keeps every write of the ack path but one at the end of its
// bucket: keys that start with a time (a ref is receipt time + id) go to
// the last leaf page, so a group commit of many events dirties a few pages,
// not one per event per bucket. Only the id index takes random inserts.
var (
	bucketEvents  = []byte("events")  // ref -> counts, content type, body
	bucketKeys    = []byte("keys")    // id -> key expiry + receipt time: dedupe key and id index
	bucketKeyExp  = []byte("keyexp")  // expiry + id -> nil, to expire keys in order
	bucketPending = []byte("pending") // target -> ref -> delivery
	bucketDead    = []byte("dead")    // target -> ref -> delivery
	bucketMeta    = []byte("meta")    // keyPendingEvents -> count

	// keyPendingEvents counts the events still owed to a target, kept in
	// step by every write so that opening a store does not count them.
	keyPendingEvents = []byte("pending_events")
)

// appendFill is the fill of pages in buckets whose keys start with a time:
// their inserts append, so bbolt's default half-full split would leave
// every page half empty.
const appendFill = 0.95

// initialMmap is how much of the file at path bbolt maps up front: twice
// its size and at least 1 GiB on 64-bit systems (address space is cheap
// there), bbolt's own growth on others.
func initialMmap(path string) int {
	if strconv.IntSize < 64 {
		return 0
	}
	size := int64(0)
	if fi, err := os.Stat(path); err == nil {
		size = fi.Size()
	}
	return int(max(1<<30, 2*size))
}

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

	settleDelay time.Duration // settleDelay; tests make it long
}

type op struct {
	fn   func(*bolt.Tx) error
	done chan error
	// later: nobody waits; the writer calls then once fn is durable and
	// may hold the op back up to settleDelay for company.
	later bool
	then  func(error)
}

// settleDelay is how long a write nobody waits for (a delivery's outcome)
// may wait for others before it commits. An ack's write never waits: it
// takes every queued outcome along. Delivery outcomes then share fsyncs
// with acks and with each other instead of each costing one, which took
// the writer away from acks.
const settleDelay = 5 * time.Millisecond

// finish reports the outcome of o's commit.
func (o *op) finish(err error) {
	if !o.later {
		o.done <- err
		return
	}
	then := o.then
	o.fn, o.then, o.later = nil, nil, false
	opPool.Put(o)
	then(err)
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
		// The freelist is rebuilt by a scan at open instead of being
		// written at every commit: under churn it grows to many pages.
		NoFreelistSync: true,
		// Growing the file past its mapping remaps it, which waits for
		// every read transaction: one loading a backlog would hold up
		// every write.
		InitialMmapSize: initialMmap(path),
	})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("opening store %s: file is locked by another process (another Caddy using the same storage?): %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("opening store: %w", err) // err names the path
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketEvents, bucketKeys, bucketKeyExp, bucketPending, bucketDead, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		if tx.Bucket(bucketMeta).Get(keyPendingEvents) != nil {
			return nil
		}
		// A file without the counter (new, or written before it existed).
		n, err := countPendingEvents(tx.Bucket(bucketPending))
		if err != nil {
			return err
		}
		return addPendingEvents(tx, n)
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

		settleDelay: settleDelay,
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
	// Write the freelist once, on the way out, so the next open reads it
	// instead of rebuilding it by reading every page of the file (23 s
	// for 1,000,000 pending events with a cold page cache). The first
	// commit after that open drops it again. After a crash the next open
	// rebuilds it.
	s.db.NoFreelistSync = false
	err := s.db.Update(func(*bolt.Tx) error { return nil })
	return errors.Join(err, s.db.Close())
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

// submitLater queues fn for a commit without waiting for it; then is
// called from the writer once fn is durable or has failed.
func (s *Bolt) submitLater(fn func(*bolt.Tx) error, then func(error)) {
	o := opPool.Get().(*op)
	o.fn, o.then, o.later = fn, then, true
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		o.finish(ErrClosed)
		return
	}
	s.ops <- o
	s.mu.RUnlock()
}

func (s *Bolt) writer() {
	defer close(s.done)
	batch := make([]*op, 0, maxBatch)
	wait := time.NewTimer(settleDelay)
	wait.Stop()
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
		if first.later {
			batch = s.waitForCompany(batch, wait)
		}
		// Let the goroutines that are ready to run queue their writes
		// before this commit starts. Without it, with one CPU the writer
		// runs as soon as the first write is queued (the scheduler runs
		// a goroutine woken by a channel next), commits it alone, and
		// every request pays a whole fsync of its own.
		for range 4 {
			n := len(s.ops)
			runtime.Gosched()
			if len(s.ops) == n {
				break
			}
		}
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

// waitForCompany adds queued writes to a batch of writes nobody waits for,
// until one that somebody waits for arrives, settleDelay passes, or the
// batch is full.
func (s *Bolt) waitForCompany(batch []*op, wait *time.Timer) []*op {
	wait.Reset(s.settleDelay)
	defer wait.Stop()
	for len(batch) < maxBatch {
		select {
		case o := <-s.ops:
			batch = append(batch, o)
			if !o.later {
				return batch
			}
		case <-wait.C:
			return batch
		case <-s.quit:
			return batch
		}
	}
	return batch
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
			o.finish(s.db.Update(o.fn))
		}
		return
	}
	if errors.As(err, &oe) {
		err = oe.err
	}
	for _, o := range batch {
		o.finish(err)
	}
}

// addPendingEvents moves the persisted count of pending events by delta.
func addPendingEvents(tx *bolt.Tx, delta int) error {
	if delta == 0 {
		return nil
	}
	b := tx.Bucket(bucketMeta)
	var n int64
	if v := b.Get(keyPendingEvents); len(v) == 8 {
		n = int64(binary.BigEndian.Uint64(v))
	}
	v := make([]byte, 8)
	binary.BigEndian.PutUint64(v, uint64(n+int64(delta)))
	return b.Put(keyPendingEvents, v)
}

// index is a keys-bucket value: the key's expiry (0: not a dedupe key,
// only the index of a stored event) and the event's receipt time.
type index struct {
	expiry int64
	recv   int64
}

func (x index) encode() []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint64(b, uint64(x.expiry))
	binary.BigEndian.PutUint64(b[8:], uint64(x.recv))
	return b
}

func getIndex(tx *bolt.Tx, id ID) (index, bool) {
	v := tx.Bucket(bucketKeys).Get(id[:])
	if len(v) != 16 {
		return index{}, false
	}
	return index{expiry: int64(binary.BigEndian.Uint64(v)), recv: int64(binary.BigEndian.Uint64(v[8:]))}, true
}

func refAt(recv int64, id ID) []byte { return makeRef(time.Unix(0, recv), id) }

func expKey(expiry int64, id ID) []byte {
	k := make([]byte, 8+len(id))
	binary.BigEndian.PutUint64(k, uint64(expiry))
	copy(k[8:], id[:])
	return k
}

// An events-bucket value: owed and dead counts, content type, body.
const countsLen = 8

func encodeEvent(owed, dead uint32, ev *Event) []byte {
	b := make([]byte, countsLen+2+len(ev.ContentType)+len(ev.Body))
	binary.BigEndian.PutUint32(b, owed)
	binary.BigEndian.PutUint32(b[4:], dead)
	binary.BigEndian.PutUint16(b[8:], uint16(len(ev.ContentType)))
	n := copy(b[10:], ev.ContentType)
	copy(b[10+n:], ev.Body)
	return b
}

func decodeCounts(v []byte) (owed, dead uint32, err error) {
	if len(v) < countsLen+2 {
		return 0, 0, errCorrupt
	}
	return binary.BigEndian.Uint32(v), binary.BigEndian.Uint32(v[4:]), nil
}

// stored is an event's record as found in a transaction.
type stored struct {
	id         ID
	ref        []byte
	owed, dead uint32
	val        []byte // valid until the transaction ends
}

// lookup finds a stored event by id.
func lookup(tx *bolt.Tx, id ID) (*stored, error) {
	x, ok := getIndex(tx, id)
	if !ok {
		return nil, nil
	}
	ref := refAt(x.recv, id)
	v := tx.Bucket(bucketEvents).Get(ref)
	if v == nil {
		return nil, nil
	}
	owed, dead, err := decodeCounts(v)
	if err != nil {
		return nil, err
	}
	return &stored{id: id, ref: ref, owed: owed, dead: dead, val: v}, nil
}

// save writes back the counts of e, or deletes the event once nothing
// references it (and its index entry, unless it is still a dedupe key).
func (e *stored) save(tx *bolt.Tx) error {
	events := tx.Bucket(bucketEvents)
	if e.owed == 0 && e.dead == 0 {
		if err := events.Delete(e.ref); err != nil {
			return err
		}
		if x, ok := getIndex(tx, e.id); ok && x.expiry == 0 {
			return tx.Bucket(bucketKeys).Delete(e.id[:])
		}
		return nil
	}
	v := make([]byte, len(e.val))
	copy(v, e.val)
	binary.BigEndian.PutUint32(v, e.owed)
	binary.BigEndian.PutUint32(v[4:], e.dead)
	return events.Put(e.ref, v)
}

// Accept implements Store.
func (s *Bolt) Accept(ev *Event, targets []string, keyExpiry, now time.Time) (bool, error) {
	var dup bool
	id := ev.ID
	err := s.submit(func(tx *bolt.Tx) error {
		dup = false
		keys := tx.Bucket(bucketKeys)
		exps := tx.Bucket(bucketKeyExp)
		if x, ok := getIndex(tx, id); ok {
			if x.expiry > now.UnixNano() || tx.Bucket(bucketEvents).Get(refAt(x.recv, id)) != nil {
				dup = true
				return nil
			}
			if x.expiry != 0 {
				if err := exps.Delete(expKey(x.expiry, id)); err != nil {
					return err
				}
			}
		}
		if keyExpiry.IsZero() && len(targets) == 0 {
			return nil
		}
		x := index{recv: ev.ReceivedAt.UnixNano()}
		if !keyExpiry.IsZero() {
			x.expiry = keyExpiry.UnixNano()
			exps.FillPercent = appendFill
			if err := exps.Put(expKey(x.expiry, id), nil); err != nil {
				return err
			}
		}
		if err := keys.Put(id[:], x.encode()); err != nil {
			return err
		}
		if len(targets) == 0 {
			return nil
		}
		ref := makeRef(ev.ReceivedAt, id)
		events := tx.Bucket(bucketEvents)
		events.FillPercent = appendFill
		if err := events.Put(ref, encodeEvent(uint32(len(targets)), 0, ev)); err != nil {
			return err
		}
		if err := addPendingEvents(tx, 1); err != nil {
			return err
		}
		d := encodeDelivery(&Delivery{NextAt: now})
		pending := tx.Bucket(bucketPending)
		for _, t := range targets {
			b, err := pending.CreateBucketIfNotExists([]byte(t))
			if err != nil {
				return err
			}
			b.FillPercent = appendFill
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
		x, ok := getIndex(tx, id)
		seen = ok && (x.expiry > now.UnixNano() || tx.Bucket(bucketEvents).Get(refAt(x.recv, id)) != nil)
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
		e, err := lookup(tx, id)
		if err != nil {
			return err
		}
		if e == nil {
			return ErrNotFound
		}
		at, _, _ := parseRef(e.ref)
		ctype, body, err := decodeBody(e.val[countsLen:])
		if err != nil {
			return err
		}
		ev = &Event{ID: id, ReceivedAt: at, ContentType: ctype, Body: body}
		return nil
	})
	return ev, err
}

// Settle implements Store.
func (s *Bolt) Settle(d *Delivery, o Outcome) (Change, error) {
	var ch Change
	err := s.submit(func(tx *bolt.Tx) error { return settleTx(tx, d, o, &ch) })
	if err != nil {
		return Change{}, err
	}
	return ch, nil
}

// SettleLater implements Store.
func (s *Bolt) SettleLater(d *Delivery, o Outcome, then func(Change, error)) {
	var ch Change
	s.submitLater(func(tx *bolt.Tx) error { return settleTx(tx, d, o, &ch) }, func(err error) {
		if err != nil {
			ch = Change{}
		}
		then(ch, err)
	})
}

// settleTx records an outcome; it sets *ch afresh on every run.
func settleTx(tx *bolt.Tx, d *Delivery, o Outcome, ch *Change) error {
	*ch = Change{}
	e, err := lookup(tx, d.ID)
	if err != nil || e == nil {
		return err
	}
	target := []byte(d.Target)
	pb := tx.Bucket(bucketPending).Bucket(target)
	db := tx.Bucket(bucketDead).Bucket(target)
	inPending := pb != nil && pb.Get(e.ref) != nil
	inDead := db != nil && db.Get(e.ref) != nil
	owed := e.owed
	switch o {
	case Retry:
		if !inPending {
			return nil
		}
		return pb.Put(e.ref, encodeDelivery(d))
	case Dead:
		if !inPending {
			return nil
		}
		if err := pb.Delete(e.ref); err != nil {
			return err
		}
		db, err := tx.Bucket(bucketDead).CreateBucketIfNotExists(target)
		if err != nil {
			return err
		}
		if err := db.Put(e.ref, encodeDelivery(d)); err != nil {
			return err
		}
		e.owed--
		e.dead++
		ch.Pending, ch.Dead = -1, 1
	case Delivered:
		if inPending {
			if err := pb.Delete(e.ref); err != nil {
				return err
			}
			e.owed--
			ch.Pending = -1
		}
		if inDead {
			if err := db.Delete(e.ref); err != nil {
				return err
			}
			e.dead--
			ch.Dead = -1
		}
	}
	if owed > 0 && e.owed == 0 {
		ch.PendingEvents = -1
		if err := addPendingEvents(tx, -1); err != nil {
			return err
		}
	}
	return e.save(tx)
}

// Backlog implements Store: a read transaction, held until Close.
func (s *Bolt) Backlog() (Backlog, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return nil, ErrClosed
	}
	tx, err := s.db.Begin(false)
	if err != nil {
		return nil, err
	}
	return boltBacklog{tx}, nil
}

type boltBacklog struct{ tx *bolt.Tx }

func (b boltBacklog) PendingEvents() int {
	v := b.tx.Bucket(bucketMeta).Get(keyPendingEvents)
	if len(v) != 8 {
		return 0
	}
	return int(binary.BigEndian.Uint64(v))
}

func (b boltBacklog) Targets() []string { return nonEmpty(b.tx.Bucket(bucketPending)) }

func (b boltBacklog) DeadTargets() []string { return nonEmpty(b.tx.Bucket(bucketDead)) }

// nonEmpty returns the names of top's non-empty sub-buckets.
func nonEmpty(top *bolt.Bucket) []string {
	var out []string
	_ = top.ForEachBucket(func(k []byte) error {
		if first, _ := top.Bucket(k).Cursor().First(); first != nil {
			out = append(out, string(k))
		}
		return nil
	})
	return out
}

func (b boltBacklog) Dead() (map[string]int, error) { return keyCounts(b.tx.Bucket(bucketDead)) }

// keyCounts counts the keys of each of top's non-empty sub-buckets.
func keyCounts(top *bolt.Bucket) (map[string]int, error) {
	out := map[string]int{}
	err := top.ForEachBucket(func(k []byte) error {
		if n := top.Bucket(k).Stats().KeyN; n > 0 {
			out[string(k)] = n
		}
		return nil
	})
	return out, err
}

func (b boltBacklog) Pending(fn func(d *Delivery) error) error {
	pending := b.tx.Bucket(bucketPending)
	return pending.ForEachBucket(func(target []byte) error {
		t := string(target)
		return pending.Bucket(target).ForEach(func(k, v []byte) error {
			d, err := decodeDelivery(t, k, v)
			if err != nil {
				return err
			}
			return fn(d)
		})
	})
}

func (b boltBacklog) Close() error { return b.tx.Rollback() }

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
			n++
			e, err := lookup(tx, d.ID)
			if err != nil || e == nil {
				return err
			}
			if e.owed > 0 {
				e.owed--
				if e.owed == 0 {
					settled++
				}
			}
			e.dead++
			return e.save(tx)
		})
		if err != nil {
			return err
		}
		if err := addPendingEvents(tx, -settled); err != nil {
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
		events := tx.Bucket(bucketEvents)
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
					last := list[len(list)-1]
					next = encodeCursor(last.Target, makeRef(last.ReceivedAt, last.ID))
					return nil
				}
				d, err := decodeDelivery(t, k, v)
				if err != nil {
					return err
				}
				dl := DeadLetter{Delivery: *d}
				if ev := events.Get(k); len(ev) >= countsLen {
					if dl.ContentType, dl.Body, err = decodeBody(ev[countsLen:]); err != nil {
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

// deadRefs returns the refs of target's dead letters among ids (all of
// them when ids is empty).
func deadRefs(tx *bolt.Tx, b *bolt.Bucket, ids []ID) ([][]byte, error) {
	var refs [][]byte
	if len(ids) == 0 {
		err := b.ForEach(func(k, _ []byte) error { refs = append(refs, append([]byte{}, k...)); return nil })
		return refs, err
	}
	for _, id := range ids {
		e, err := lookup(tx, id)
		if err != nil {
			return nil, err
		}
		if e != nil && b.Get(e.ref) != nil {
			refs = append(refs, e.ref)
		}
	}
	return refs, nil
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
			refs, err := deadRefs(tx, db, ids)
			if err != nil {
				return err
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
				out = append(out, d)
				e, err := lookup(tx, id)
				if err != nil {
					return err
				}
				if e == nil {
					continue
				}
				if e.owed == 0 {
					revived++
				}
				e.owed++
				e.dead--
				if err := e.save(tx); err != nil {
					return err
				}
			}
		}
		return addPendingEvents(tx, revived)
	})
	return out, revived, err
}

// DeleteDead implements Store.
func (s *Bolt) DeleteDead(id ID, target string) (map[string]int, error) {
	var n map[string]int
	err := s.submit(func(tx *bolt.Tx) error {
		n = map[string]int{}
		e, err := lookup(tx, id)
		if err != nil || e == nil {
			return err
		}
		dead := tx.Bucket(bucketDead)
		err = dead.ForEachBucket(func(name []byte) error {
			if target != "" && string(name) != target {
				return nil
			}
			b := dead.Bucket(name)
			if b.Get(e.ref) == nil {
				return nil
			}
			n[string(name)]++
			e.dead--
			return b.Delete(e.ref)
		})
		if err != nil {
			return err
		}
		return e.save(tx)
	})
	return n, err
}

// ExpireKeys implements Store. It works in slices so that a large sweep
// does not hold up the acks queued behind it. A key whose event is still
// stored stays as the event's index entry, no longer a dedupe key.
func (s *Bolt) ExpireKeys(now time.Time) (int, error) {
	total := 0
	for {
		var n int
		var more bool
		err := s.submit(func(tx *bolt.Tx) error {
			n, more = 0, false
			keys := tx.Bucket(bucketKeys)
			events := tx.Bucket(bucketEvents)
			c := tx.Bucket(bucketKeyExp).Cursor()
			for k, _ := c.First(); k != nil; k, _ = c.First() {
				if len(k) != 8+len(ID{}) || int64(binary.BigEndian.Uint64(k)) > now.UnixNano() {
					return nil
				}
				if n == 5000 {
					more = true
					return nil
				}
				var id ID
				copy(id[:], k[8:])
				exp := int64(binary.BigEndian.Uint64(k))
				if x, ok := getIndex(tx, id); ok && x.expiry == exp {
					var err error
					if events.Get(refAt(x.recv, id)) != nil {
						err = keys.Put(id[:], index{recv: x.recv}.encode())
					} else {
						err = keys.Delete(id[:])
					}
					if err != nil {
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

// Stats implements Store. It counts afresh, reading every pending and
// dead-letter entry (never the events' bodies): the pending events by
// merging the pending buckets, not from the count the writes keep, so the
// two can be checked against each other.
func (s *Bolt) Stats(now time.Time) (Stats, error) {
	var st Stats
	err := s.view(func(tx *bolt.Tx) error {
		var err error
		if st.PendingEvents, err = countPendingEvents(tx.Bucket(bucketPending)); err != nil {
			return err
		}
		if st.Pending, err = keyCounts(tx.Bucket(bucketPending)); err != nil {
			return err
		}
		if st.Dead, err = keyCounts(tx.Bucket(bucketDead)); err != nil {
			return err
		}
		st.Keys = tx.Bucket(bucketKeyExp).Stats().KeyN
		return nil
	})
	return st, err
}

// countPendingEvents counts the distinct refs over every target's pending
// bucket: an event is pending while any target owes it. Each bucket is
// sorted by ref, so one merge pass over their cursors counts them.
func countPendingEvents(pending *bolt.Bucket) (int, error) {
	var curs []*bolt.Cursor
	var heads [][]byte
	err := pending.ForEachBucket(func(name []byte) error {
		c := pending.Bucket(name).Cursor()
		if k, _ := c.First(); k != nil {
			curs = append(curs, c)
			heads = append(heads, k)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	n := 0
	var buf []byte
	for len(curs) > 0 {
		low := heads[0]
		for _, k := range heads[1:] {
			if bytes.Compare(k, low) < 0 {
				low = k
			}
		}
		low = append(buf[:0], low...) // cursor keys change as they move
		buf = low
		n++
		for i := 0; i < len(curs); {
			if !bytes.Equal(heads[i], low) {
				i++
				continue
			}
			if k, _ := curs[i].Next(); k != nil {
				heads[i] = k
				i++
				continue
			}
			curs = append(curs[:i], curs[i+1:]...)
			heads = append(heads[:i], heads[i+1:]...)
		}
	}
	return n, nil
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
