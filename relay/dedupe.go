package relay

import (
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// dedupe is the in-memory front of the store's dedupe keys: fixed-size ids
// mapped to their expiry. The store stays the authority (a key missing here
// may have been evicted, or seen before a restart).
//
// It is golang-lru's simplelru rather than its expirable LRU: the expirable
// one starts a cleanup goroutine that v2.0.7 cannot stop (its Close is
// commented out), one leaked goroutine per engine; expiry is checked here
// against the engine's clock instead, which tests can also drive.
type dedupe struct {
	mu        sync.Mutex
	lru       *simplelru.LRU[store.ID, int64]
	now       int64 // set under mu before calls that may evict
	evictions func()
}

func newDedupe(capacity int, evictions func()) *dedupe {
	d := &dedupe{evictions: evictions}
	d.lru, _ = simplelru.NewLRU[store.ID, int64](capacity, d.onEvict)
	return d
}

// onEvict counts keys pushed out by capacity before their expiry.
func (d *dedupe) onEvict(_ store.ID, expiry int64) {
	if expiry > d.now && d.evictions != nil {
		d.evictions()
	}
}

// seen reports whether id is held and unexpired at now.
func (d *dedupe) seen(id store.ID, now time.Time) bool {
	n := now.UnixNano()
	d.mu.Lock()
	defer d.mu.Unlock()
	d.now = n
	exp, ok := d.lru.Get(id)
	if ok && exp <= n {
		d.lru.Remove(id)
		return false
	}
	return ok
}

// add records id until expiry.
func (d *dedupe) add(id store.ID, expiry, now time.Time) {
	d.mu.Lock()
	d.now = now.UnixNano()
	d.lru.Add(id, expiry.UnixNano())
	d.mu.Unlock()
}

func (d *dedupe) len() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.lru.Len()
}

func (d *dedupe) resize(capacity int, now time.Time) {
	d.mu.Lock()
	d.now = now.UnixNano()
	d.lru.Resize(capacity)
	d.mu.Unlock()
}
