package store

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The ack path of a Bolt store goes through its write-ahead log (wal.go):
// an Accept is checked for a duplicate, logged with the others of its
// group in one write and one fdatasync, queued for delivery and acked.
// The writer applies logged events to the bbolt file in its next commit,
// before the writes of that commit (a delivery's outcome always follows
// its event into the file), and records in the same transaction how far
// the log is applied. Until then a logged event lives in memory too, so
// that deliveries, dedupe and reads see it.

// keyWALApplied is the meta key of the last log record applied, keyWALID
// that of the id of the file's log.
var (
	keyWALApplied = []byte("wal_applied")
	keyWALID      = []byte("wal_id")
)

// applyInterval is how long logged events may wait for a commit when no
// other write comes to carry them (a delivery's outcome does, within
// settleDelay) and applyBytes is not reached: bbolt commits compete with
// the log for the disk, so fewer and larger ones keep the acks' tail
// short, and a second of events replays in well under the restart's
// budget.
const applyInterval = time.Second

// applyBatch is how many logged events make the writer apply at once,
// and applyBytes how many bytes of them: what the log holds beyond the
// file stays small, which bounds the disk both copies take (a disk that
// fills with events in the log and not yet in the file has room for
// them in the file once that much is freed).
const (
	applyBatch = 4096
	applyBytes = 256 << 10
)

// yieldEvery is how many writes of a commit run between two yields.
const yieldEvery = 16

// applyChunk is how many logged events a transaction takes when a
// transaction of all of them failed: on a disk with little room the
// file can take some where it cannot take all.
const applyChunk = 32

// logged is an event logged and not yet applied to the file.
type logged struct {
	seq       uint64 // its log record
	ev        *Event
	targets   []string
	orderKeys []string // nil, or one per target ("" for none)
	keyExpiry int64    // 0: no dedupe key
	orderSeq  uint64   // its place among keyed deliveries, when it has one
}

// acceptOp is an Accept waiting for the logger.
type acceptOp struct {
	l    logged
	dup  bool
	done chan error
}

var acceptPool = sync.Pool{New: func() any { return &acceptOp{done: make(chan error, 1)} }}

// encodeLogged is a log record's payload:
//
//	version 1 | id | recv i64 | key expiry i64 | order seq u64 | targets u16
//	| per target: len u16, name, len u16, order key | len u16, content type | body
func encodeLogged(l *logged) []byte {
	n := 1 + len(ID{}) + 8 + 8 + 8 + 2 + 2 + len(l.ev.ContentType) + len(l.ev.Body)
	for i, t := range l.targets {
		n += 4 + len(t)
		if l.orderKeys != nil {
			n += len(l.orderKeys[i])
		}
	}
	b := make([]byte, 0, n)
	b = append(b, 1)
	b = append(b, l.ev.ID[:]...)
	b = binary.LittleEndian.AppendUint64(b, uint64(l.ev.ReceivedAt.UnixNano()))
	b = binary.LittleEndian.AppendUint64(b, uint64(l.keyExpiry))
	b = binary.LittleEndian.AppendUint64(b, l.orderSeq)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(l.targets)))
	for i, t := range l.targets {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(t)))
		b = append(b, t...)
		key := ""
		if l.orderKeys != nil {
			key = l.orderKeys[i]
		}
		b = binary.LittleEndian.AppendUint16(b, uint16(len(key)))
		b = append(b, key...)
	}
	b = binary.LittleEndian.AppendUint16(b, uint16(len(l.ev.ContentType)))
	b = append(b, l.ev.ContentType...)
	return append(b, l.ev.Body...)
}

func decodeLogged(seq uint64, b []byte) (*logged, error) {
	bad := fmt.Errorf("log record %d: %w", seq, errCorrupt)
	if len(b) < 1+len(ID{})+8+8+8+2 || b[0] != 1 {
		return nil, bad
	}
	l := &logged{seq: seq, ev: &Event{}}
	b = b[1:]
	copy(l.ev.ID[:], b)
	b = b[len(ID{}):]
	l.ev.ReceivedAt = time.Unix(0, int64(binary.LittleEndian.Uint64(b)))
	l.keyExpiry = int64(binary.LittleEndian.Uint64(b[8:]))
	l.orderSeq = binary.LittleEndian.Uint64(b[16:])
	n := int(binary.LittleEndian.Uint16(b[24:]))
	b = b[26:]
	str := func() (string, bool) {
		if len(b) < 2 {
			return "", false
		}
		k := int(binary.LittleEndian.Uint16(b))
		if len(b) < 2+k {
			return "", false
		}
		s := string(b[2 : 2+k])
		b = b[2+k:]
		return s, true
	}
	for range n {
		t, ok := str()
		if !ok {
			return nil, bad
		}
		key, ok := str()
		if !ok {
			return nil, bad
		}
		l.targets = append(l.targets, t)
		if key != "" && l.orderKeys == nil {
			l.orderKeys = make([]string, n)
		}
		if l.orderKeys != nil {
			l.orderKeys[len(l.targets)-1] = key
		}
	}
	ctype, ok := str()
	if !ok {
		return nil, bad
	}
	l.ev.ContentType = ctype
	l.ev.Body = b
	return l, nil
}

// applyLogged writes a logged event into the file: its dedupe key, its
// record and a pending delivery per target.
func applyLogged(tx *bolt.Tx, l *logged) error {
	id := l.ev.ID
	keys := tx.Bucket(bucketKeys)
	exps := tx.Bucket(bucketKeyExp)
	if x, ok := getIndex(tx, id); ok && x.expiry != 0 {
		if err := exps.Delete(expKey(x.expiry, id[:])); err != nil {
			return err
		}
	}
	recv := l.ev.ReceivedAt.UnixNano()
	x := index{recv: recv, expiry: l.keyExpiry}
	if x.expiry != 0 {
		exps.FillPercent = appendFill
		if err := exps.Put(expKey(x.expiry, id[:]), nil); err != nil {
			return err
		}
	}
	if err := keys.Put(id[:], x.encode()); err != nil {
		return err
	}
	if len(l.targets) == 0 {
		return nil
	}
	ref := makeRef(l.ev.ReceivedAt, id)
	events := tx.Bucket(bucketEvents)
	events.FillPercent = appendFill
	if err := events.Put(ref, encodeEvent(uint32(len(l.targets)), 0, l.ev)); err != nil {
		return err
	}
	if err := addPendingEvents(tx, 1); err != nil {
		return err
	}
	pending := tx.Bucket(bucketPending)
	if l.orderKeys != nil && l.orderSeq > pending.Sequence() {
		if err := pending.SetSequence(l.orderSeq); err != nil {
			return err
		}
	}
	d := encodeDelivery(&Delivery{NextAt: l.ev.ReceivedAt}, 0)
	for i, t := range l.targets {
		b, err := pending.CreateBucketIfNotExists([]byte(t))
		if err != nil {
			return err
		}
		b.FillPercent = appendFill
		v := d
		if l.orderKeys != nil && l.orderKeys[i] != "" {
			v = encodeDelivery(&Delivery{NextAt: l.ev.ReceivedAt, OrderKey: l.orderKeys[i]}, l.orderSeq)
		}
		if err := b.Put(ref, v); err != nil {
			return err
		}
	}
	return nil
}

func putApplied(tx *bolt.Tx, seq uint64) error {
	v := make([]byte, 8)
	binary.BigEndian.PutUint64(v, seq)
	return tx.Bucket(bucketMeta).Put(keyWALApplied, v)
}

// logID returns the id of the file's log, making one for a file that has
// none (new, or written by a relay without a log).
func logID(tx *bolt.Tx) (uint64, error) {
	meta := tx.Bucket(bucketMeta)
	if v := meta.Get(keyWALID); len(v) == 8 {
		return binary.BigEndian.Uint64(v), nil
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(b[:]), meta.Put(keyWALID, b[:])
}

func readApplied(tx *bolt.Tx) uint64 {
	if v := tx.Bucket(bucketMeta).Get(keyWALApplied); len(v) == 8 {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// replayLog applies the records the last run logged and did not apply,
// in transactions of applyBatch.
func replayLog(db *bolt.DB, recs []walRecord) error {
	for len(recs) > 0 {
		n := min(len(recs), applyBatch)
		err := db.Update(func(tx *bolt.Tx) error {
			for _, r := range recs[:n] {
				l, err := decodeLogged(r.seq, r.payload)
				if err != nil {
					return err
				}
				if err := applyLogged(tx, l); err != nil {
					return err
				}
			}
			return putApplied(tx, recs[n-1].seq)
		})
		if err != nil {
			return fmt.Errorf("replaying the log: %w", err)
		}
		recs = recs[n:]
	}
	return nil
}

// unapplied are the logged events not yet in the file, by id and in log
// order.
type unapplied struct {
	mu    sync.Mutex
	byID  map[ID]*logged
	order []*logged
	bytes int // of the bodies in order
}

func (u *unapplied) get(id ID) *logged {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.byID[id]
}

// add queues ls to be applied, and reports whether to apply now.
func (u *unapplied) add(ls []*logged) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, l := range ls {
		u.byID[l.ev.ID] = l
		u.bytes += len(l.ev.Body)
	}
	u.order = append(u.order, ls...)
	return len(u.order) >= applyBatch || u.bytes >= applyBytes
}

// take returns every logged event for a commit; done then forgets them
// (committed) or puts them back first in line (not).
func (u *unapplied) take() []*logged {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := u.order
	u.order, u.bytes = nil, 0
	return out
}

func (u *unapplied) done(ls []*logged, committed bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !committed {
		u.order = slices.Concat(ls, u.order)
		for _, l := range ls {
			u.bytes += len(l.ev.Body)
		}
		return
	}
	for _, l := range ls {
		if u.byID[l.ev.ID] == l {
			delete(u.byID, l.ev.ID)
		}
	}
}

// oldest returns the receipt time of the oldest logged event of each
// target.
func (u *unapplied) oldest() map[string]time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := map[string]time.Time{}
	for _, l := range u.order {
		for _, t := range l.targets {
			if at, ok := out[t]; !ok || l.ev.ReceivedAt.Before(at) {
				out[t] = l.ev.ReceivedAt
			}
		}
	}
	return out
}

func (u *unapplied) len() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.order)
}

// logger takes Accepts in groups: everything queued when it looks, once
// the goroutines ready to run have queued theirs (see gather).
func (s *Bolt) logger() {
	defer close(s.loggerDone)
	batch := make([]*acceptOp, 0, maxBatch)
	for {
		var first *acceptOp
		select {
		case first = <-s.accepts:
		case <-s.quit:
			for {
				select {
				case a := <-s.accepts:
					s.logGroup(append(batch[:0], a))
				default:
					return
				}
			}
		}
		batch = gather(s.accepts, append(batch[:0], first))
		s.logGroup(batch)
	}
}

// logGroup checks a group for duplicates, logs the rest and queues their
// deliveries.
func (s *Bolt) logGroup(batch []*acceptOp) {
	fail := func(err error) {
		for _, a := range batch {
			a.done <- err
		}
	}
	if p := s.applyErr.Load(); p != nil {
		// The file takes no writes: an ack now would be an event the
		// store cannot deliver until it does.
		fail(*p)
		return
	}
	// Duplicates: among the logged first, then in the file, read after
	// (an event leaves the logged set only once it is in the file).
	fresh := make(map[ID]bool, len(batch))
	var unknown []*acceptOp
	for _, a := range batch {
		id := a.l.ev.ID
		if fresh[id] {
			a.dup = true
			continue
		}
		if l := s.logged.get(id); l != nil {
			a.dup = l.keyExpiry > a.l.ev.ReceivedAt.UnixNano() || len(l.targets) > 0
			if a.dup {
				continue
			}
		}
		fresh[id] = true
		unknown = append(unknown, a)
	}
	if len(unknown) > 0 {
		// Not s.view: its lock would wait behind a Close waiting for an
		// Accept blocked on a full queue to this goroutine. The file
		// stays open until the logger has stopped.
		err := s.db.View(func(tx *bolt.Tx) error {
			for _, a := range unknown {
				id := a.l.ev.ID
				if x, ok := getIndex(tx, id); ok {
					a.dup = x.expiry > a.l.ev.ReceivedAt.UnixNano() || tx.Bucket(bucketEvents).Get(refAt(x.recv, id)) != nil
				}
			}
			return nil
		})
		if err != nil {
			fail(err)
			return
		}
	}
	var payloads [][]byte
	var ls []*logged
	for _, a := range batch {
		if a.dup || (a.l.keyExpiry == 0 && len(a.l.targets) == 0) {
			continue
		}
		if a.l.orderKeys != nil {
			s.orderSeq++
			a.l.orderSeq = s.orderSeq
		}
		l := a.l
		p := encodeLogged(&l)
		// The caller may reuse what it passed once Accept returns: the
		// logged event keeps the record's copy (its body is its end).
		ev := *l.ev
		ev.Body = p[len(p)-len(ev.Body):]
		l.ev = &ev
		l.targets = slices.Clone(l.targets)
		l.orderKeys = slices.Clone(l.orderKeys)
		ls = append(ls, &l)
		payloads = append(payloads, p)
	}
	if len(payloads) > 0 {
		last, err := s.wal.appendGroup(payloads)
		if err != nil {
			fail(err)
			return
		}
		for i, l := range ls {
			l.seq = last - uint64(len(ls)-1-i)
		}
		s.kick(s.logged.add(ls))
		for _, l := range ls {
			s.queueLogged(l)
		}
	}
	for _, a := range batch {
		a.done <- nil
	}
}

// queueLogged queues a logged event's deliveries.
func (s *Bolt) queueLogged(l *logged) {
	recv := l.ev.ReceivedAt.UnixNano()
	for i, t := range l.targets {
		it := item{due: recv, recv: recv, id: l.ev.ID}
		if l.orderKeys == nil || l.orderKeys[i] == "" {
			s.qs.get(t).push(it)
		} else {
			s.qs.get(t).pushKeyed(keyedItem{it: it, key: l.orderKeys[i], seq: l.orderSeq})
		}
	}
}

// kick tells the writer there are logged events to apply: now, or
// within applyInterval.
func (s *Bolt) kick(now bool) {
	ch := s.applySoon
	if now {
		ch = s.applyNow
	}
	select {
	case ch <- struct{}{}:
	default:
	}
}

// flush waits until everything logged so far is in the file, for reads
// that look in the file only.
func (s *Bolt) flush() error {
	if s.logged.len() == 0 {
		return nil
	}
	return s.submit(func(*bolt.Tx) error { return nil }, nil)
}

// applyLoggedTx writes ls into tx and records how far the log is applied.
func applyLoggedTx(tx *bolt.Tx, ls []*logged) error {
	for i, l := range ls {
		if err := applyLogged(tx, l); err != nil {
			return err
		}
		if i%yieldEvery == yieldEvery-1 {
			// A large apply is milliseconds of tree work: on a busy
			// core, an ack waiting for the log must not wait for it.
			runtime.Gosched()
		}
	}
	return putApplied(tx, ls[len(ls)-1].seq)
}
