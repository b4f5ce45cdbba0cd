package relay

import (
	"context"
	"sync"
	"time"
)

// breaker gates a target's workers. After tripAfter attempts in a row
// failed with a retryable error and nothing succeeded for a while, the
// target is taken for down: it is held, and one probe goes out at a time,
// each after a cooldown on the target's backoff curve; the first answer
// other than a retryable error releases it. Without it, every pending
// delivery keeps its own retry schedule, and a large backlog retries
// against a dead service thousands of times a second, taking the CPU and
// the store from the acks. The quiet period keeps a flaky target that
// still answers now and then (runs of ten failures are common at a high
// rate) from being held.
//
// The breaker sits in front of the store's queue: a worker passes it
// before taking a delivery, so a held target's deliveries stay queued
// without using an attempt.
type breaker struct {
	mu        sync.Mutex
	fails     int   // retryable failures in a row
	lastOK    int64 // unix ns of the last answer that was not one
	held      bool
	probes    int   // failures since the breaker tripped
	probing   bool  // a probe is out
	holdUntil int64 // while held, no probe goes out before this
	changed   chan struct{}

	rev uint64 // revision of the shared record last seen or written
}

// tripAfter is how many retryable failures in a row trip the breaker,
// provided nothing succeeded for the target's backoff minimum.
const tripAfter = 10

func newBreaker() *breaker { return &breaker{changed: make(chan struct{})} }

// notifyLocked wakes every worker waiting in enter.
func (b *breaker) notifyLocked() {
	close(b.changed)
	b.changed = make(chan struct{})
}

// enter waits until the calling worker may take a delivery: at once
// while the target is not held; while it is, when no probe is out and the
// cooldown has passed, and the worker's delivery is then the probe. It
// returns false when ctx is done.
func (b *breaker) enter(ctx context.Context, now func() time.Time) (probe, ok bool) {
	for {
		b.mu.Lock()
		if !b.held {
			b.mu.Unlock()
			return false, true
		}
		n := now().UnixNano()
		if !b.probing && n >= b.holdUntil {
			b.probing = true
			b.mu.Unlock()
			return true, true
		}
		changed := b.changed
		var timer *time.Timer
		var fire <-chan time.Time
		if !b.probing {
			timer = time.NewTimer(time.Duration(b.holdUntil - n))
			fire = timer.C
		}
		b.mu.Unlock()
		done := false
		select {
		case <-changed:
		case <-fire:
		case <-ctx.Done():
			done = true
		}
		if timer != nil {
			timer.Stop()
		}
		if done {
			return false, false
		}
	}
}

// leave ends a probe; asked says whether it asked the target. A probe
// that asked nothing (its delivery expired, say) lets the next one go at
// once.
func (b *breaker) leave(probe, asked bool, now int64) {
	if !probe {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.probing = false
	if b.held && !asked && b.holdUntil > now {
		b.holdUntil = now
	}
	b.notifyLocked()
}

// failed counts a retryable failure at now. Once held, no probe goes out
// for cooldown(n) (n: failures since the trip, from 1). It reports
// whether this failure tripped the breaker, and whether the target is
// held now.
func (b *breaker) failed(now int64, quiet time.Duration, cooldown func(n int) time.Duration) (tripped, held bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.fails++
	if !b.held {
		if b.fails < tripAfter || now-b.lastOK < int64(quiet) {
			return false, false
		}
		b.held, b.probes, tripped = true, 0, true
	}
	b.probes++
	b.holdUntil = now + int64(cooldown(b.probes))
	return tripped, true
}

// answered records, at now, an answer that is not a retryable failure and
// reports whether it released a held target.
func (b *breaker) answered(now int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lastOK = now
	return b.releaseLocked()
}

// release forgets the failures (the target's settings changed) and
// reports whether that released a held target.
func (b *breaker) release() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.releaseLocked()
}

func (b *breaker) releaseLocked() bool {
	b.fails = 0
	if !b.held {
		return false
	}
	b.held, b.holdUntil = false, 0
	b.notifyLocked()
	return true
}

// isHeld reports whether the breaker holds the target.
func (b *breaker) isHeld() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.held
}

// wake makes waiting workers look at the clock again (a test's fake
// clock moved).
func (b *breaker) wake() {
	b.mu.Lock()
	b.notifyLocked()
	b.mu.Unlock()
}

// The breaker's state is the relay's, not an instance's: on a shared
// store every instance holds a target together, and one probe goes out at
// a time across all of them. Each instance counts its own failures; the
// trip, every probe, its failure and the release are written to the
// store's key states (space breakerSpace, key the target's name) with a
// compare-and-set, and every instance reads the record back once a
// second (syncBreakers) and adopts it. On a store of one process the
// same record keeps a held target held across a restart.
const (
	breakerSpace = "breaker"
	breakerSync  = time.Second
	// breakerKeep is how long a breaker record outlives its last write.
	breakerKeep = 24 * time.Hour
)

// breakerRecord is the breaker's shared state.
type breakerRecord struct {
	Held       bool  `json:"held"`
	HoldUntil  int64 `json:"hold_until"`  // unix ns: no probe before
	Probes     int   `json:"probes"`      // failures since the trip
	ProbeUntil int64 `json:"probe_until"` // unix ns: a probe is out until then
}

// adopt takes the shared record read at revision rev, unless the breaker
// saw that revision already.
func (b *breaker) adopt(rec breakerRecord, rev uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if rev == b.rev {
		return
	}
	b.rev = rev
	if !rec.Held {
		b.releaseLocked()
		return
	}
	b.held, b.probes = true, rec.Probes
	if !b.probing {
		// Another instance's probe, if one is out, holds this one's.
		b.holdUntil = max(rec.HoldUntil, rec.ProbeUntil)
	}
	b.notifyLocked()
}

// seen records the revision of a write the breaker made itself.
func (b *breaker) seen(rev uint64) {
	b.mu.Lock()
	b.rev = rev
	b.mu.Unlock()
}

// snapshot returns the breaker's state as a shared record, with no probe
// out.
func (b *breaker) snapshot() breakerRecord {
	b.mu.Lock()
	defer b.mu.Unlock()
	return breakerRecord{Held: b.held, HoldUntil: b.holdUntil, Probes: b.probes}
}

// deferProbe makes a probe wait for one another instance has out, until
// until: the caller's claim on the shared record lost.
func (b *breaker) deferProbe(until int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.probing = false
	b.holdUntil = max(b.holdUntil, until)
	b.notifyLocked()
}
