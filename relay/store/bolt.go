package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// The layout keeps every write of the ack path but one at the end of its
// bucket: keys that start with a time (a ref is receipt time + id) go to
// the last leaf page, so a group commit of many events dirties a few pages,
// not one per event per bucket. Only the id index takes random inserts.
var (
	bucketEvents   = []byte("events")   // ref -> counts, content type, body
	bucketKeys     = []byte("keys")     // id -> key expiry + receipt time: dedupe key and id index
	bucketKeyExp   = []byte("keyexp")   // expiry + id -> nil, to expire keys in order
	bucketPending  = []byte("pending")  // target -> ref -> delivery; its sequence places keyed deliveries in queue order
	bucketDead     = []byte("dead")     // target -> ref -> delivery
	bucketMeta     = []byte("meta")     // keyFormat, keyPendingEvents
	bucketState    = []byte("state")    // space NUL key -> revision, expiry, value
	bucketStateExp = []byte("stateexp") // expiry + state key -> nil, to expire key states in order

	// keyPendingEvents counts the events still owed to a target, kept in
	// step by every write so that opening a store does not count them.
	keyPendingEvents = []byte("pending_events")
	// keyFormat is the file's format version: a relay refuses a file of a
	// format newer than its own rather than misread it.
	keyFormat = []byte("format")
)

// formatVersion is the format this code writes. Format 1 is the layout of
// the files written before the version was recorded, plus the key-state
// buckets: a file without the key is taken for format 1.
const formatVersion = 1

// formatLogged marks a file whose log may hold events not yet in it: a
// relay that knows no log (format 1) refuses it. A clean Close, having
// applied the log, writes format 1 back.
const formatLogged = 2

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

// loadBatch is how many backlog deliveries the load queues at a time.
const loadBatch = 4096

// sweepSlice bounds the keys (and key states) one transaction of
// ExpireKeys forgets, so that a large sweep does not hold up the acks
// queued behind it.
const sweepSlice = 5000

// BoltOptions configure a Bolt store.
type BoltOptions struct {
	// Timeout is how long OpenBolt waits for a file that another process
	// holds locked; zero waits as long as it takes, as bbolt does.
	Timeout time.Duration
	// Now is the clock deliveries fall due by and key states expire by;
	// nil is time.Now.
	Now func() time.Time

	// afterBatch, if set, is called by the backlog load after each batch
	// it queues: tests hold the load there.
	afterBatch func()
	// holdLog keeps logged events out of the file, as a crash before
	// their apply would: tests of the log's replay.
	holdLog bool
}

// Bolt is the durable store: one bbolt file. Writes from any number of
// goroutines are queued to one writer, which commits everything queued
// since its last commit in one transaction, so concurrent requests share an
// fsync without any added delay when the load is light. Its queues are in
// memory, loaded from the file in the background after OpenBolt.
type Bolt struct {
	db   *bolt.DB
	path string
	now  func() time.Time
	qs   *localQueues

	ops chan *op
	mu  sync.RWMutex // excludes submit and reads from Close

	// The ack path: Accepts go to the logger, which logs them and hands
	// them to the writer to apply (boltwal.go).
	wal        *walLog
	accepts    chan *acceptOp
	loggerDone chan struct{}
	logged     unapplied
	orderSeq   uint64                // the logger's: the last keyed delivery's place
	applyErr   atomic.Pointer[error] // the last apply's failure, until one succeeds
	applySoon  chan struct{}
	applyNow   chan struct{}
	closed     bool
	quit       chan struct{}
	done       chan struct{} // closed when the writer has stopped
	loaded     chan struct{} // closed when the backlog is queued (or Close cut it short)

	settleDelay time.Duration // settleDelay; tests make it long
	afterBatch  func()
	holdLog     bool

	// The counts behind Counts, kept in step by the writes once they are
	// durable: pendingEvents mirrors keyPendingEvents (plus the events
	// being accepted, so that MaxPending holds while they are), dead the
	// dead-letter count of each target.
	pendingEvents atomic.Int64
	deadMu        sync.Mutex
	dead          map[string]int
}

type op struct {
	fn func(*bolt.Tx) error
	// after applies what fn did to the queues and counts once it is
	// durable. The writer calls it, in commit order, so that the queues
	// see the writes in the order the file does (an ack's delivery is
	// never queued after a retirement that dead-lettered it).
	after func()
	done  chan error
	// later: nobody waits; the writer calls then once fn is durable and
	// may hold the op back up to settleDelay for company.
	later bool
	then  func(error)
}

// settleDelay is how long a write nobody waits for (a delivery's outcome)
// may wait for others before it commits. A write somebody waits for never
// waits: it takes every queued outcome along, and so does each commit
// that applies the log. Delivery outcomes then share commits with each
// other and with the log's events instead of each costing one: a bbolt
// commit is two fdatasyncs and reads in every node it changes, so in a
// burst their number decides how much of the core the writer takes.
//
// At 5 ms, outcomes made about 200 commits a second in a burst; at 50 ms
// about 20, and the same load benchmark run gave 12-26% more acks and
// 17-37% more deliveries (README, Performance). The price is on a crash:
// outcomes not yet committed are lost and those attempts made again, so
// a kill -9 re-sends up to 50 ms of deliveries instead of 5 ms (at least
// once, as before).
const settleDelay = 50 * time.Millisecond

// finish reports the outcome of o's commit.
func (o *op) finish(err error) {
	if err == nil && o.after != nil {
		o.after()
	}
	if !o.later {
		o.done <- err
		return
	}
	then := o.then
	o.fn, o.after, o.then, o.later = nil, nil, nil, false
	opPool.Put(o)
	then(err)
}

var opPool = sync.Pool{New: func() any { return &op{done: make(chan error, 1)} }}

// OpenBolt opens (creating if need be) the store file at path, and starts
// queueing its pending deliveries in the background (see Loaded): it takes
// writes meanwhile. It fails after opts.Timeout if another process holds
// the file.
func OpenBolt(path string, opts BoltOptions) (*Bolt, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating store directory: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:      opts.Timeout,
		FreelistType: bolt.FreelistMapType,
		// The freelist is rebuilt by a scan at open instead of being
		// written at every commit: under churn it grows to many pages.
		NoFreelistSync: true,
		// Growing the file past its mapping remaps it, which waits for
		// every read transaction: the one loading the backlog would hold
		// up every write.
		InitialMmapSize: initialMmap(path),
	})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("opening store %s: file is locked by another process (another Caddy using the same storage?): %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("opening store: %w", err) // err names the path
	}
	if err := db.Update(initFile); err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising store %s: %w", path, err)
	}
	wal, orderSeq, err := openLog(db, path+walExt)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("opening store %s: %w", path, err)
	}
	// The backlog: everything pending now. Writes from here on queue what
	// they make pending themselves, so nothing is queued twice.
	snap, err := db.Begin(false)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("reading store %s: %w", path, err)
	}
	dead, err := keyCounts(snap.Bucket(bucketDead))
	if err != nil {
		snap.Rollback()
		db.Close()
		return nil, fmt.Errorf("reading store %s: %w", path, err)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	s := &Bolt{
		db:     db,
		path:   path,
		now:    now,
		ops:    make(chan *op, maxBatch),
		quit:   make(chan struct{}),
		done:   make(chan struct{}),
		loaded: make(chan struct{}),
		dead:   dead,

		wal:        wal,
		accepts:    make(chan *acceptOp, maxBatch),
		loggerDone: make(chan struct{}),
		logged:     unapplied{byID: map[ID]*logged{}},
		orderSeq:   orderSeq,
		applySoon:  make(chan struct{}, 1),
		applyNow:   make(chan struct{}, 1),

		settleDelay: settleDelay,
		afterBatch:  opts.afterBatch,
		holdLog:     opts.holdLog,
	}
	s.pendingEvents.Store(int64(readPendingEvents(snap)))
	s.qs = newLocalQueues(now, s)
	s.qs.loading = true
	go s.writer()
	go s.logger()
	go s.load(snap)
	return s, nil
}

// openLog opens the store's log, applies what the last run logged and
// did not apply, and marks the file as one with a log (format 2) until a
// clean Close, so that a relay that knows no log refuses it rather than
// miss what the log holds. It returns the log and the last place given
// to a keyed delivery.
func openLog(db *bolt.DB, dir string) (*walLog, uint64, error) {
	var applied, id uint64
	err := db.Update(func(tx *bolt.Tx) error {
		applied = readApplied(tx)
		var err error
		if id, err = logID(tx); err != nil {
			return err
		}
		return putFormat(tx, formatLogged)
	})
	if err != nil {
		return nil, 0, err
	}
	wal, recs, err := openWAL(dir, id, 0, applied)
	if err != nil {
		return nil, 0, err
	}
	if err := replayLog(db, recs); err != nil {
		wal.closeFiles()
		return nil, 0, err
	}
	if len(recs) > 0 {
		wal.release(recs[len(recs)-1].seq)
	}
	var orderSeq uint64
	_ = db.View(func(tx *bolt.Tx) error {
		orderSeq = tx.Bucket(bucketPending).Sequence()
		return nil
	})
	return wal, orderSeq, nil
}

func putFormat(tx *bolt.Tx, v uint32) error {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, v)
	return tx.Bucket(bucketMeta).Put(keyFormat, b)
}

// initFile creates what a new file lacks, checks the format of one that
// is not new, and counts the pending events of one written before they
// were counted.
func initFile(tx *bolt.Tx) error {
	for _, b := range [][]byte{bucketEvents, bucketKeys, bucketKeyExp, bucketPending, bucketDead, bucketMeta, bucketState, bucketStateExp} {
		if _, err := tx.CreateBucketIfNotExists(b); err != nil {
			return err
		}
	}
	meta := tx.Bucket(bucketMeta)
	switch v := meta.Get(keyFormat); {
	case v == nil:
		b := make([]byte, 4)
		binary.BigEndian.PutUint32(b, formatVersion)
		if err := meta.Put(keyFormat, b); err != nil {
			return err
		}
	case len(v) != 4:
		return fmt.Errorf("format version: %w", errCorrupt)
	case binary.BigEndian.Uint32(v) > formatLogged:
		return fmt.Errorf("the file has format %d, newer than this relay's %d: it was written by a newer relay; upgrade this one",
			binary.BigEndian.Uint32(v), formatLogged)
	}
	if meta.Get(keyPendingEvents) != nil {
		return nil
	}
	// A file without the counter (new, or written before it existed).
	n, err := countPendingEvents(tx.Bucket(bucketPending))
	if err != nil {
		return err
	}
	return addPendingEvents(tx, n)
}

func readPendingEvents(tx *bolt.Tx) int {
	v := tx.Bucket(bucketMeta).Get(keyPendingEvents)
	if len(v) != 8 {
		return 0
	}
	return int(binary.BigEndian.Uint64(v))
}

// load queues the deliveries pending in snap, the snapshot taken at open,
// in batches, while the store already takes writes. A target retired
// meanwhile drops what is still to come (see localQueue.pushLoaded).
func (s *Bolt) load(snap *bolt.Tx) {
	defer close(s.loaded)
	defer s.qs.loaded()
	defer snap.Rollback()
	pending := snap.Bucket(bucketPending)
	batch := make([]item, 0, loadBatch)
	var keyed []keyedItem
	errStop := errors.New("store closing")
	_ = pending.ForEachBucket(func(name []byte) error {
		q := s.qs.get(string(name))
		c := pending.Bucket(name).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			it, seq, key, err := decodeItem(k, v)
			if err != nil {
				// Unreadable as a delivery anywhere else too: leave it
				// on disk rather than give up the rest.
				continue
			}
			if len(key) == 0 {
				batch = append(batch, it)
			} else {
				keyed = append(keyed, keyedItem{it: it, key: string(key), seq: seq})
			}
			if len(batch)+len(keyed) < loadBatch {
				continue
			}
			if !s.pushLoaded(q, batch, keyed) {
				return errStop
			}
			batch, keyed = batch[:0], keyed[:0]
		}
		if !s.pushLoaded(q, batch, keyed) {
			return errStop
		}
		batch, keyed = batch[:0], keyed[:0]
		q.loaded()
		return nil
	})
}

// pushLoaded queues a batch of the backlog and reports whether to go on.
func (s *Bolt) pushLoaded(q *localQueue, batch []item, keyed []keyedItem) bool {
	q.pushLoaded(batch, keyed)
	if s.afterBatch != nil {
		s.afterBatch()
	}
	select {
	case <-s.quit:
		return false
	default:
		return true
	}
}

// Loaded implements Loader.
func (s *Bolt) Loaded() <-chan struct{} { return s.loaded }

// Path returns the file's path.
func (s *Bolt) Path() string { return s.path }

// Wake makes every waiting Take look at the clock again: for a clock
// that moves other than in real time.
func (s *Bolt) Wake() { s.qs.wake() }

// Close waits for queued writes to commit, then closes the file. Takes
// waiting return ErrClosed; leases held are abandoned, and their
// deliveries taken again after the next open.
func (s *Bolt) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.quit)
	s.mu.Unlock()
	s.qs.close()
	<-s.loggerDone
	<-s.done
	<-s.loaded // its snapshot would keep bbolt's Close waiting
	// The writer has applied everything logged, unless the file failed.
	format := uint32(formatVersion)
	if s.logged.len() > 0 {
		format = formatLogged
	}
	// Write the freelist once, on the way out, so the next open reads it
	// instead of rebuilding it by reading every page of the file (23 s
	// for 1,000,000 pending events with a cold page cache). The first
	// commit after that open drops it again. After a crash the next open
	// rebuilds it.
	s.db.NoFreelistSync = false
	err := s.db.Update(func(tx *bolt.Tx) error { return putFormat(tx, format) })
	return errors.Join(err, s.wal.closeFiles(), s.db.Close())
}

// submit runs fn in the next group commit and returns once it is durable,
// after the writer has called after (if not nil). fn may run twice (a
// second time alone, when another write of its batch failed), so it must
// set its results afresh on each run.
func (s *Bolt) submit(fn func(*bolt.Tx) error, after func()) error {
	o := opPool.Get().(*op)
	o.fn, o.after = fn, after
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		o.fn, o.after = nil, nil
		opPool.Put(o)
		return ErrClosed
	}
	s.ops <- o
	s.mu.RUnlock()
	err := <-o.done
	o.fn, o.after = nil, nil
	opPool.Put(o)
	return err
}

// submitLater queues fn for a commit without waiting for it; after (once
// fn is durable) and then are called from the writer.
func (s *Bolt) submitLater(fn func(*bolt.Tx) error, after func(), then func(error)) {
	o := opPool.Get().(*op)
	o.fn, o.after, o.then, o.later = fn, after, then, true
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
	// apply is armed while logged events wait for a commit to carry them.
	apply := time.NewTimer(applyInterval)
	apply.Stop()
	armed := false
	arm := func() {
		if !armed {
			apply.Reset(applyInterval)
			armed = true
		}
	}
	for {
		var first *op
		select {
		case first = <-s.ops:
		case <-s.applyNow:
			s.commit(gather(s.ops, batch[:0]))
			continue
		case <-s.applySoon:
			arm()
			continue
		case <-apply.C:
			armed = false
			if !s.commit(gather(s.ops, batch[:0])) {
				arm() // the file failed: try again
			}
			continue
		case <-s.quit:
			// No submit can send any more, and once the logger has
			// stopped nothing more is logged: commit what is queued.
			<-s.loggerDone
			for {
				select {
				case o := <-s.ops:
					s.commit(append(batch[:0], o))
				default:
					s.commit(nil)
					return
				}
			}
		}
		batch = append(batch[:0], first)
		if first.later {
			batch = s.waitForCompany(batch, wait)
		}
		batch = gather(s.ops, batch)
		if !s.commit(batch) {
			arm()
		}
	}
}

// gather adds to batch what ch holds, after letting the goroutines that
// are ready to run queue theirs. Without that, with one CPU the writer
// runs as soon as the first write is queued (the scheduler runs a
// goroutine woken by a channel next), commits it alone, and every request
// pays a whole fsync of its own.
func gather[T any](ch chan T, batch []T) []T {
	for range 4 {
		n := len(ch)
		runtime.Gosched()
		if len(ch) == n {
			break
		}
	}
	for len(batch) < maxBatch {
		select {
		case o := <-ch:
			batch = append(batch, o)
		default:
			return batch
		}
	}
	return batch
}

// waitForCompany adds queued writes to a batch of writes nobody waits for,
// until one that somebody waits for arrives, the log has enough to apply
// (the commit takes it along), settleDelay passes, or the batch is full.
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
		case <-s.applyNow:
			return batch
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

// commit applies the logged events, then runs batch, in one transaction.
// It reports whether the logged events are in the file (or there were
// none).
func (s *Bolt) commit(batch []*op) bool {
	var ls []*logged
	if !s.holdLog {
		ls = s.logged.take()
	}
	if len(batch) == 0 && len(ls) == 0 {
		return true
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		if len(ls) > 0 {
			if err := applyLoggedTx(tx, ls); err != nil {
				return err
			}
		}
		for i, o := range batch {
			if err := o.fn(tx); err != nil {
				return opError{err}
			}
			if i%yieldEvery == yieldEvery-1 {
				runtime.Gosched()
			}
		}
		return nil
	})
	var oe opError
	own := errors.As(err, &oe)
	if own {
		err = oe.err
	}
	switch {
	case err == nil:
		s.applied(ls, nil)
	case own && (len(batch) > 1 || len(ls) > 0):
		// One write failed on its own account: give each its own
		// transaction so the others are not lost with it, the logged
		// events first (the writes may be outcomes of their deliveries).
		if err := s.applyApart(ls, len(ls)); err != nil {
			for _, o := range batch {
				o.finish(err)
			}
			return false
		}
		for _, o := range batch {
			o.finish(s.db.Update(o.fn))
		}
		return true
	default:
		// The file failed: perhaps too much for the room left, so what
		// fits goes in, and freed space is used as it comes.
		s.applyApart(ls, applyChunk)
	}
	for _, o := range batch {
		o.finish(err)
	}
	return s.applyErr.Load() == nil
}

// applyApart applies logged events in transactions of their own, size at
// a time, until one fails; the rest wait for the next commit. It returns
// that failure.
func (s *Bolt) applyApart(ls []*logged, size int) error {
	for len(ls) > 0 {
		chunk := ls[:min(len(ls), size)]
		if err := s.db.Update(func(tx *bolt.Tx) error { return applyLoggedTx(tx, chunk) }); err != nil {
			s.applied(ls, err)
			return err
		}
		s.applied(chunk, nil)
		ls = ls[len(chunk):]
	}
	return nil
}

// applied settles the logged events of a commit: forgotten once in the
// file, their log records released; put back for the next commit if the
// commit failed, and Accepts refused meanwhile (err is why).
func (s *Bolt) applied(ls []*logged, err error) bool {
	if len(ls) == 0 {
		return true
	}
	if err != nil {
		s.logged.done(ls, false)
		err = fmt.Errorf("writing logged events into the file: %w", err)
		s.applyErr.Store(&err)
		return false
	}
	s.logged.done(ls, true)
	s.wal.release(ls[len(ls)-1].seq)
	s.applyErr.Store(nil)
	return true
}

func (s *Bolt) view(fn func(*bolt.Tx) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return ErrClosed
	}
	return s.db.View(fn)
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

func (s *Bolt) addDead(target string, delta int) {
	if delta == 0 {
		return
	}
	s.deadMu.Lock()
	if n := s.dead[target] + delta; n > 0 {
		s.dead[target] = n
	} else {
		delete(s.dead, target)
	}
	s.deadMu.Unlock()
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

func expKey(expiry int64, id []byte) []byte {
	k := make([]byte, 8+len(id))
	binary.BigEndian.PutUint64(k, uint64(expiry))
	copy(k[8:], id)
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

// reserve counts one more pending event for an Accept, unless max (when
// above zero) are pending already.
func (s *Bolt) reserve(max int) bool {
	if max <= 0 {
		s.pendingEvents.Add(1)
		return true
	}
	for {
		n := s.pendingEvents.Load()
		if n >= int64(max) {
			return false
		}
		if s.pendingEvents.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Accept implements Intake.
func (s *Bolt) Accept(ctx context.Context, ev *Event, targets []string, opts AcceptOptions) (bool, error) {
	targets, orderKeys, err := targetKeys(targets, opts.OrderKeys)
	if err != nil {
		return false, fmt.Errorf("accepting event %s: %w", ev.ID, err)
	}
	// Checked here, not when the log is applied: a record the file
	// refuses would stop every write behind it.
	for i, t := range targets {
		if t == "" {
			return false, fmt.Errorf("accepting event %s: %w", ev.ID, bolterrors.ErrBucketNameRequired)
		}
		if len(t) > min(bolt.MaxKeySize, math.MaxUint16) {
			return false, fmt.Errorf("accepting event %s: target name of %d bytes: %w", ev.ID, len(t), bolterrors.ErrKeyTooLarge)
		}
		if orderKeys != nil && len(orderKeys[i]) > math.MaxUint16 {
			return false, fmt.Errorf("accepting event %s: order key of %d bytes, at most %d", ev.ID, len(orderKeys[i]), math.MaxUint16)
		}
	}
	if len(ev.ContentType) > math.MaxUint16 {
		return false, fmt.Errorf("accepting event %s: content type of %d bytes", ev.ID, len(ev.ContentType))
	}
	if len(targets) > 0 && !s.reserve(opts.MaxPending) {
		// A duplicate is one still, full or not: the sender may stop
		// sending it.
		seen, err := s.Seen(ctx, ev.ID, ev.ReceivedAt)
		if err != nil || seen {
			return seen, err
		}
		return false, ErrFull
	}
	a := acceptPool.Get().(*acceptOp)
	a.l = logged{ev: ev, targets: targets, orderKeys: orderKeys}
	if !opts.KeyExpiry.IsZero() {
		a.l.keyExpiry = opts.KeyExpiry.UnixNano()
	}
	a.dup = false
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		err = ErrClosed
	} else {
		s.accepts <- a
		s.mu.RUnlock()
		err = <-a.done
	}
	dup := a.dup
	a.l = logged{}
	acceptPool.Put(a)
	if len(targets) > 0 && (err != nil || dup) {
		s.pendingEvents.Add(-1)
	}
	if err != nil {
		return false, err
	}
	return dup, nil
}

// Seen implements Intake.
func (s *Bolt) Seen(_ context.Context, id ID, now time.Time) (bool, error) {
	if l := s.logged.get(id); l != nil && (l.keyExpiry > now.UnixNano() || len(l.targets) > 0) {
		return true, nil
	}
	var seen bool
	err := s.view(func(tx *bolt.Tx) error {
		x, ok := getIndex(tx, id)
		seen = ok && (x.expiry > now.UnixNano() || tx.Bucket(bucketEvents).Get(refAt(x.recv, id)) != nil)
		return nil
	})
	return seen, err
}

// Queue implements Queues.
func (s *Bolt) Queue(target string, opts QueueOptions) (Queue, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return nil, ErrClosed
	}
	q := s.qs.get(target)
	q.setOrdered(opts.Ordered)
	q.reopen()
	return localTaker{q: q, take: s.take}, nil
}

// take leases the next due delivery of q with its event, read now.
func (s *Bolt) take(ctx context.Context, q *localQueue) (Lease, error) {
	for {
		it, key, epoch, err := q.take(ctx)
		if err != nil {
			return nil, err
		}
		var ev *Event
		ref := refAt(it.recv, it.id)
		if l := s.logged.get(it.id); l != nil && l.ev.ReceivedAt.UnixNano() == it.recv {
			// Logged, not yet in the file: nothing can have settled it.
			return &localLease{q: q, it: it, key: key, epoch: epoch, ev: l.ev}, nil
		}
		err = s.view(func(tx *bolt.Tx) error {
			pb := tx.Bucket(bucketPending).Bucket([]byte(q.target))
			if pb == nil || pb.Get(ref) == nil {
				return nil // settled meanwhile: nothing to deliver
			}
			v := tx.Bucket(bucketEvents).Get(ref)
			if v == nil {
				return nil
			}
			if len(v) < countsLen {
				return errCorrupt
			}
			ctype, body, err := decodeBody(v[countsLen:])
			if err != nil {
				return err
			}
			ev = &Event{ID: it.id, ReceivedAt: time.Unix(0, it.recv), ContentType: ctype, Body: body}
			return nil
		})
		if errors.Is(err, ErrClosed) {
			return nil, err
		}
		if err != nil {
			// Not this delivery's fault, perhaps: try it again soon.
			it.due = s.now().Add(time.Second).UnixNano()
			q.putBack(it, epoch)
			return nil, fmt.Errorf("reading event %s for %s: %w", it.id, q.target, err)
		}
		if ev == nil {
			q.release(it, epoch)
			continue
		}
		return &localLease{q: q, it: it, key: key, epoch: epoch, ev: ev}, nil
	}
}

// change is what one settle did, for the counts and the queue.
type change struct {
	dead          int // at the delivery's target
	pendingEvents int
	// stillPending: the delivery is pending yet (a retry of one that
	// was), to be queued again.
	stillPending bool
}

// settleLease records an outcome in the next group commit, applying it to
// the counts and the queue once durable.
func (s *Bolt) settleLease(l *localLease, o Outcome, d *Delivery, then func(error)) {
	var ch change
	s.submitLater(func(tx *bolt.Tx) error { return settleTx(tx, d, o, &ch) },
		func() {
			s.addDead(d.Target, ch.dead)
			s.pendingEvents.Add(int64(ch.pendingEvents))
			l.settled(o, d, ch.stillPending, nil)
		},
		func(err error) {
			if err != nil {
				l.settled(o, d, false, err)
			}
			then(err)
		})
}

// settleTx records an outcome; it sets *ch afresh on every run.
func settleTx(tx *bolt.Tx, d *Delivery, o Outcome, ch *change) error {
	*ch = change{}
	e, err := lookup(tx, d.ID)
	if err != nil || e == nil {
		return err
	}
	target := []byte(d.Target)
	pb := tx.Bucket(bucketPending).Bucket(target)
	db := tx.Bucket(bucketDead).Bucket(target)
	var stored []byte
	if pb != nil {
		stored = pb.Get(e.ref)
	}
	inPending := stored != nil
	inDead := db != nil && db.Get(e.ref) != nil
	owed := e.owed
	var rec []byte
	if inPending && o != Delivered {
		// The order key and place stay as stored, whatever d says.
		seq, key, err := deliveryOrder(stored)
		if err != nil {
			return err
		}
		c := *d
		c.OrderKey = string(key)
		rec = encodeDelivery(&c, seq)
	}
	switch o {
	case Retry:
		if !inPending {
			return nil
		}
		ch.stillPending = true
		return pb.Put(e.ref, rec)
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
		if err := db.Put(e.ref, rec); err != nil {
			return err
		}
		e.owed--
		e.dead++
		ch.dead = 1
	case Delivered:
		if inPending {
			if err := pb.Delete(e.ref); err != nil {
				return err
			}
			e.owed--
		}
		if inDead {
			if err := db.Delete(e.ref); err != nil {
				return err
			}
			e.dead--
			ch.dead = -1
		}
	}
	if owed > 0 && e.owed == 0 {
		ch.pendingEvents = -1
		if err := addPendingEvents(tx, -1); err != nil {
			return err
		}
	}
	return e.save(tx)
}

// Retire implements Queues: the target's pending deliveries become dead
// letters with reason as their last error.
func (s *Bolt) Retire(_ context.Context, target, reason string) (int, error) {
	q := s.qs.get(target)
	q.retire()
	now := s.now()
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
			seq, _, err := deliveryOrder(v)
			if err != nil {
				return err
			}
			d.LastError = reason
			if d.LastAttemptAt.IsZero() {
				d.LastAttemptAt = now
			}
			if err := db.Put(bytes.Clone(k), encodeDelivery(d, seq)); err != nil {
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
	}, func() {
		q.clear()
		s.addDead(target, n)
		s.pendingEvents.Add(-int64(settled))
	})
	return n, err
}

// DeadLetters implements DeadLetters.
func (s *Bolt) DeadLetters(_ context.Context, target, cursor string, limit int) ([]DeadLetter, string, error) {
	limit = ListLimit(limit)
	var list []DeadLetter
	var next string
	err := s.view(func(tx *bolt.Tx) error {
		events := tx.Bucket(bucketEvents)
		var err error
		next, err = pageDeliveries(tx.Bucket(bucketDead), target, cursor, limit, func(t string, k, v []byte) error {
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
			return nil
		})
		return err
	})
	return list, next, err
}

// pageDeliveries walks the per-target buckets under parent (pending or
// dead): one target's, or every target's in name order, each in ref
// order, from after cursor. It gives add the key and value of up to limit
// deliveries and returns the cursor of the next page ("" on the last).
func pageDeliveries(parent *bolt.Bucket, target, cursor string, limit int, add func(target string, k, v []byte) error) (string, error) {
	var fromTarget string
	var fromRef []byte
	if cursor != "" {
		var err error
		if fromTarget, fromRef, err = decodeCursor(cursor); err != nil {
			return "", err
		}
	}
	var names []string
	if target != "" {
		names = []string{target}
	} else {
		_ = parent.ForEachBucket(func(k []byte) error { names = append(names, string(k)); return nil })
	}
	n := 0
	var lastTarget string
	var lastRef []byte
	for _, t := range names {
		if t < fromTarget {
			continue
		}
		b := parent.Bucket([]byte(t))
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
			if n == limit {
				return encodeCursor(lastTarget, lastRef), nil
			}
			if err := add(t, k, v); err != nil {
				return "", err
			}
			n++
			lastTarget, lastRef = t, bytes.Clone(k)
		}
	}
	return "", nil
}

// deadRefs returns the refs of target's dead letters among ids (all of
// them when ids is empty), in ref order: replayed, those of one order key
// go in their receipt order.
func deadRefs(tx *bolt.Tx, b *bolt.Bucket, ids []ID) ([][]byte, error) {
	var refs [][]byte
	if len(ids) == 0 {
		err := b.ForEach(func(k, _ []byte) error { refs = append(refs, bytes.Clone(k)); return nil })
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
	slices.SortFunc(refs, bytes.Compare)
	return slices.CompactFunc(refs, bytes.Equal), nil
}

// Replay implements DeadLetters.
func (s *Bolt) Replay(_ context.Context, ids []ID, target string, keep func(string) bool) (int, error) {
	now := s.now()
	type queued struct {
		items []item
		keyed []keyedItem
	}
	moved := map[string]*queued{}
	n, revived := 0, 0
	err := s.submit(func(tx *bolt.Tx) error {
		clear(moved)
		n, revived = 0, 0
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
			mv := &queued{}
			moved[t] = mv
			for _, ref := range refs {
				at, id, err := parseRef(ref)
				if err != nil {
					return err
				}
				_, key, err := deliveryOrder(db.Get(ref))
				if err != nil {
					return err
				}
				d := Delivery{ID: id, Target: t, ReceivedAt: at, NextAt: now, OrderKey: string(key)}
				var seq uint64
				if d.OrderKey != "" {
					// Behind what is pending for its key.
					if seq, err = tx.Bucket(bucketPending).NextSequence(); err != nil {
						return err
					}
					mv.keyed = append(mv.keyed, keyedItem{it: itemOf(&d), key: d.OrderKey, seq: seq})
				} else {
					mv.items = append(mv.items, itemOf(&d))
				}
				if err := db.Delete(ref); err != nil {
					return err
				}
				if err := pb.Put(ref, encodeDelivery(&d, seq)); err != nil {
					return err
				}
				n++
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
	}, func() {
		for t, mv := range moved {
			s.qs.get(t).pushAll(mv.items, mv.keyed)
			s.addDead(t, -len(mv.items)-len(mv.keyed))
		}
		s.pendingEvents.Add(int64(revived))
	})
	return n, err
}

// DeleteDead implements DeadLetters.
func (s *Bolt) DeleteDead(_ context.Context, id ID, target string) (int, error) {
	var deleted []string
	err := s.submit(func(tx *bolt.Tx) error {
		deleted = deleted[:0]
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
			deleted = append(deleted, string(name))
			e.dead--
			return b.Delete(e.ref)
		})
		if err != nil {
			return err
		}
		return e.save(tx)
	}, func() {
		for _, t := range deleted {
			s.addDead(t, -1)
		}
	})
	return len(deleted), err
}

// ExpireKeys implements Intake. It works in slices so that a large sweep
// does not hold up the acks queued behind it. A key whose event is still
// stored stays as the event's index entry, no longer a dedupe key.
func (s *Bolt) ExpireKeys(_ context.Context, now time.Time) (int, error) {
	total := 0
	for {
		var n int
		var more bool
		err := s.submit(func(tx *bolt.Tx) error {
			n, more = 0, false
			var err error
			if n, more, err = expireKeysTx(tx, now); err != nil || more {
				return err
			}
			more, err = expireStatesTx(tx, now)
			return err
		}, nil)
		total += n
		if err != nil || !more {
			return total, err
		}
	}
}

// expireKeysTx forgets up to sweepSlice expired keys; more says there are
// others.
func expireKeysTx(tx *bolt.Tx, now time.Time) (n int, more bool, err error) {
	keys := tx.Bucket(bucketKeys)
	events := tx.Bucket(bucketEvents)
	c := tx.Bucket(bucketKeyExp).Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.First() {
		if len(k) != 8+len(ID{}) || int64(binary.BigEndian.Uint64(k)) > now.UnixNano() {
			return n, false, nil
		}
		if n == sweepSlice {
			return n, true, nil
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
				return n, false, err
			}
		}
		if err := c.Delete(); err != nil {
			return n, false, err
		}
		n++
	}
	return n, false, nil
}

// expireStatesTx forgets up to sweepSlice expired key states.
func expireStatesTx(tx *bolt.Tx, now time.Time) (more bool, err error) {
	states := tx.Bucket(bucketState)
	c := tx.Bucket(bucketStateExp).Cursor()
	n := 0
	for k, _ := c.First(); k != nil; k, _ = c.First() {
		if len(k) < 8 || int64(binary.BigEndian.Uint64(k)) > now.UnixNano() {
			return false, nil
		}
		if n == sweepSlice {
			return true, nil
		}
		exp := int64(binary.BigEndian.Uint64(k))
		sk := k[8:]
		// Only the record this entry was made for: one written since has
		// an entry of its own.
		if _, vexp, _, err := decodeState(states.Get(sk)); err == nil && vexp == exp {
			if err := states.Delete(bytes.Clone(sk)); err != nil {
				return false, err
			}
		}
		if err := c.Delete(); err != nil {
			return false, err
		}
		n++
	}
	return false, nil
}

// State implements KeyStates.
func (s *Bolt) State(_ context.Context, space, key string, now time.Time) ([]byte, uint64, error) {
	k, err := stateKey(space, key)
	if err != nil {
		return nil, 0, err
	}
	var value []byte
	var rev uint64
	err = s.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketState).Get(k)
		if v == nil {
			return ErrNotFound
		}
		r, exp, val, err := decodeState(v)
		if err != nil {
			return err
		}
		if stateExpired(exp, now) {
			return ErrNotFound
		}
		value, rev = bytes.Clone(val), r
		return nil
	})
	return value, rev, err
}

// SetState implements KeyStates. Revisions come from the bucket's
// sequence, so that a record written anew after another expired never has
// a revision the old one had.
func (s *Bolt) SetState(_ context.Context, space, key string, value []byte, rev uint64, expiry time.Time) (uint64, error) {
	k, err := stateKey(space, key)
	if err != nil {
		return 0, err
	}
	now := s.now()
	var newRev uint64
	var conflict bool
	err = s.submit(func(tx *bolt.Tx) error {
		newRev, conflict = 0, false
		states := tx.Bucket(bucketState)
		exps := tx.Bucket(bucketStateExp)
		var cur uint64
		if v := states.Get(k); v != nil {
			r, exp, _, err := decodeState(v)
			if err != nil {
				return err
			}
			if !stateExpired(exp, now) {
				cur = r
			}
			if cur == rev && exp != 0 {
				if err := exps.Delete(expKey(exp, k)); err != nil {
					return err
				}
			}
		}
		if cur != rev {
			conflict = true
			return nil
		}
		r, err := states.NextSequence()
		if err != nil {
			return err
		}
		if err := states.Put(k, encodeState(r, expiry, value)); err != nil {
			return err
		}
		if !expiry.IsZero() {
			if err := exps.Put(expKey(expiry.UnixNano(), k), nil); err != nil {
				return err
			}
		}
		newRev = r
		return nil
	}, nil)
	if err != nil {
		return 0, err
	}
	if conflict {
		return 0, ErrConflict
	}
	return newRev, nil
}

// Counts implements Counter: the pending deliveries as queued (a backlog
// still loading counts as it loads), the dead letters and pending events
// as kept by the writes, the oldest pending events from the file.
func (s *Bolt) Counts(context.Context) (Counts, error) {
	c := Counts{PendingEvents: int(s.pendingEvents.Load()), Targets: map[string]TargetCounts{}}
	for t, n := range s.qs.pending() {
		c.Targets[t] = TargetCounts{Pending: n}
	}
	s.deadMu.Lock()
	for t, n := range s.dead {
		tc := c.Targets[t]
		tc.Dead = n
		c.Targets[t] = tc
	}
	s.deadMu.Unlock()
	// The oldest logged event of each target first, then the file's
	// (read after: an event leaves the logged set once in the file).
	for t, at := range s.logged.oldest() {
		if tc, ok := c.Targets[t]; ok {
			tc.OldestPending = at
			c.Targets[t] = tc
		}
	}
	err := s.view(func(tx *bolt.Tx) error {
		pending := tx.Bucket(bucketPending)
		return pending.ForEachBucket(func(name []byte) error {
			k, _ := pending.Bucket(name).Cursor().First()
			if k == nil {
				return nil
			}
			at, _, err := parseRef(k)
			if err != nil {
				return err
			}
			tc := c.Targets[string(name)]
			if tc.OldestPending.IsZero() || at.Before(tc.OldestPending) {
				tc.OldestPending = at
			}
			c.Targets[string(name)] = tc
			return nil
		})
	})
	if err != nil {
		return Counts{}, err
	}
	return c, nil
}

// ListPending implements Inspector: target by target, oldest event
// first, read in one view transaction and paged with the cursors of
// DeadLetters. A delivery leased now is pending in the file, so listed.
func (s *Bolt) ListPending(_ context.Context, target, cursor string, limit int) ([]Delivery, string, error) {
	if err := s.flush(); err != nil {
		return nil, "", fmt.Errorf("listing pending deliveries: %w", err)
	}
	limit = ListLimit(limit)
	var list []Delivery
	var next string
	err := s.view(func(tx *bolt.Tx) error {
		var err error
		next, err = pageDeliveries(tx.Bucket(bucketPending), target, cursor, limit, func(t string, k, v []byte) error {
			d, err := decodeDelivery(t, k, v)
			if err != nil {
				return fmt.Errorf("reading pending delivery at %s: %w", t, err)
			}
			list = append(list, *d)
			return nil
		})
		return err
	})
	if err != nil {
		return nil, "", fmt.Errorf("listing pending deliveries: %w", err)
	}
	return list, next, nil
}

// Lookup implements Inspector: the event by its id index, and its
// deliveries by its ref in every target's buckets.
func (s *Bolt) Lookup(_ context.Context, id ID) (EventState, error) {
	if err := s.flush(); err != nil {
		return EventState{}, fmt.Errorf("looking up event %s: %w", id, err)
	}
	var st EventState
	err := s.view(func(tx *bolt.Tx) error {
		e, err := lookup(tx, id)
		if err != nil {
			return err
		}
		if e == nil {
			return ErrNotFound
		}
		recv, _, err := parseRef(e.ref)
		if err != nil {
			return err
		}
		ev := &Event{ID: id, ReceivedAt: recv}
		if ev.ContentType, ev.Body, err = decodeBody(e.val[countsLen:]); err != nil {
			return err
		}
		st.Event = ev
		pending := tx.Bucket(bucketPending)
		err = pending.ForEachBucket(func(name []byte) error {
			v := pending.Bucket(name).Get(e.ref)
			if v == nil {
				return nil
			}
			d, err := decodeDelivery(string(name), e.ref, v)
			if err != nil {
				return err
			}
			st.Pending = append(st.Pending, *d)
			return nil
		})
		if err != nil {
			return err
		}
		dead := tx.Bucket(bucketDead)
		return dead.ForEachBucket(func(name []byte) error {
			v := dead.Bucket(name).Get(e.ref)
			if v == nil {
				return nil
			}
			d, err := decodeDelivery(string(name), e.ref, v)
			if err != nil {
				return err
			}
			st.Dead = append(st.Dead, DeadLetter{Delivery: *d, ContentType: ev.ContentType, Body: bytes.Clone(ev.Body)})
			return nil
		})
	})
	if err != nil {
		return EventState{}, fmt.Errorf("looking up event %s: %w", id, err)
	}
	return st, nil
}

// Pending calls fn for every delivery pending in the file now, target by
// target, oldest event first: for tests and tools that look at what a
// relay left.
func (s *Bolt) Pending(fn func(d *Delivery) error) error {
	if err := s.flush(); err != nil {
		return err
	}
	return s.view(func(tx *bolt.Tx) error {
		pending := tx.Bucket(bucketPending)
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
	})
}

// Stats are a Bolt file's counts, counted afresh.
type Stats struct {
	// Events still owed to at least one target.
	PendingEvents int
	// Pending and dead-letter counts per target name.
	Pending map[string]int
	Dead    map[string]int
	// Keys is the number of dedupe keys held, expired ones not yet
	// swept included.
	Keys int
}

// Stats counts afresh, reading every pending and dead-letter entry (never
// the events' bodies): the pending events by merging the pending buckets,
// not from the count the writes keep, so that Counts can be checked
// against it.
func (s *Bolt) Stats(time.Time) (Stats, error) {
	if err := s.flush(); err != nil {
		return Stats{}, err
	}
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

var (
	_ Store  = (*Bolt)(nil)
	_ Loader = (*Bolt)(nil)
)
