package relay

import (
	"sync"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// dedupe is the in-memory front of the store's dedupe keys: a
// least-recently-used set of fixed-size ids with their expiry. The store
// stays the authority (a key missing here may have been evicted, or seen
// before a restart), so this is only a cache that spares the store a read.
//
// It is not golang-lru: its expirable LRU starts a cleanup goroutine that
// v2.0.7 cannot stop (Close is commented out), one leak per engine, and
// both its LRUs spend about 130 bytes a key (every entry carries a
// time.Time and three pointers), 130 MB for a million keys. This one keeps
// entries in one slice linked by int32 indices: about 60 bytes a key.
// Expiry is checked against the engine's clock, which tests can drive.
type dedupe struct {
	mu        sync.Mutex
	capacity  int
	idx       map[store.ID]int32
	ents      []lruEntry
	head      int32 // most recently used; -1 when empty
	tail      int32 // least recently used
	free      int32 // first free slot, linked through next; -1 when none
	evictions func()
}

type lruEntry struct {
	id         store.ID
	expiry     int64 // unix ns
	prev, next int32
}

const none = int32(-1)

func newDedupe(capacity int, evictions func()) *dedupe {
	return &dedupe{
		capacity:  max(capacity, 1),
		idx:       map[store.ID]int32{},
		head:      none,
		tail:      none,
		free:      none,
		evictions: evictions,
	}
}

func (d *dedupe) unlink(i int32) {
	e := &d.ents[i]
	if e.prev != none {
		d.ents[e.prev].next = e.next
	} else {
		d.head = e.next
	}
	if e.next != none {
		d.ents[e.next].prev = e.prev
	} else {
		d.tail = e.prev
	}
}

func (d *dedupe) pushFront(i int32) {
	e := &d.ents[i]
	e.prev, e.next = none, d.head
	if d.head != none {
		d.ents[d.head].prev = i
	}
	d.head = i
	if d.tail == none {
		d.tail = i
	}
}

// remove drops entry i; a key that had not expired at now counts as an
// eviction.
func (d *dedupe) remove(i int32, now int64, evicted bool) {
	d.unlink(i)
	e := &d.ents[i]
	delete(d.idx, e.id)
	if evicted && e.expiry > now && d.evictions != nil {
		d.evictions()
	}
	e.next = d.free
	d.free = i
}

// seen reports whether id is held and unexpired at now.
func (d *dedupe) seen(id store.ID, now time.Time) bool {
	n := now.UnixNano()
	d.mu.Lock()
	defer d.mu.Unlock()
	i, ok := d.idx[id]
	if !ok {
		return false
	}
	if d.ents[i].expiry <= n {
		d.remove(i, n, false)
		return false
	}
	if d.head != i {
		d.unlink(i)
		d.pushFront(i)
	}
	return true
}

// add records id until expiry.
func (d *dedupe) add(id store.ID, expiry, now time.Time) {
	n := now.UnixNano()
	d.mu.Lock()
	defer d.mu.Unlock()
	if i, ok := d.idx[id]; ok {
		d.ents[i].expiry = expiry.UnixNano()
		d.unlink(i)
		d.pushFront(i)
		return
	}
	for len(d.idx) >= d.capacity {
		d.remove(d.tail, n, true)
	}
	i := d.free
	if i != none {
		d.free = d.ents[i].next
	} else {
		d.ents = append(d.ents, lruEntry{})
		i = int32(len(d.ents) - 1)
	}
	d.ents[i].id = id
	d.ents[i].expiry = expiry.UnixNano()
	d.pushFront(i)
	d.idx[id] = i
}

func (d *dedupe) len() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.idx)
}

// resize changes the capacity, evicting the least recently used keys
// beyond it.
func (d *dedupe) resize(capacity int, now time.Time) {
	n := now.UnixNano()
	d.mu.Lock()
	defer d.mu.Unlock()
	d.capacity = max(capacity, 1)
	for len(d.idx) > d.capacity {
		d.remove(d.tail, n, true)
	}
}
