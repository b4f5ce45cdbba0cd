// Package store keeps the relay's events durably: each event's body, its
// delivery state at every target (pending or dead-lettered), and the dedupe
// keys with their expiry. Two implementations share one contract: Bolt (a
// bbolt file, group-committed, the default) and Memory (not durable).
//
// An event is kept while at least one target still owes a delivery or holds
// it as a dead letter; its dedupe key outlives it until the key expires.
package store

import (
	"encoding/hex"
	"errors"
	"time"
)

// Sentinel errors callers branch on.
var (
	// ErrClosed is returned by every method once Close has been called.
	ErrClosed = errors.New("store closed")
	// ErrNotFound is returned when an event is not in the store.
	ErrNotFound = errors.New("event not found")
)

// ID identifies an event: 16 bytes derived from its dedupe key.
type ID [16]byte

// String returns the id as 32 lowercase hex digits, the event_id users see.
func (id ID) String() string { return hex.EncodeToString(id[:]) }

// ParseID parses the 32 hex digits of an event_id.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 2*len(id) {
		return id, errors.New("event id must be 32 hex digits")
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, errors.New("event id must be 32 hex digits")
	}
	return id, nil
}

// Event is one received webhook.
type Event struct {
	ID          ID
	ReceivedAt  time.Time
	ContentType string
	Body        []byte
}

// Delivery is the state of one event at one target.
type Delivery struct {
	ID         ID
	Target     string
	ReceivedAt time.Time
	// Attempts made so far.
	Attempts int
	// NextAt is when the next attempt is due (pending deliveries only).
	NextAt         time.Time
	FirstAttemptAt time.Time
	LastAttemptAt  time.Time
	LastStatus     int
	LastError      string
}

// DeadLetter is a dead-lettered delivery with its event.
type DeadLetter struct {
	Delivery
	ContentType string
	Body        []byte
}

// Outcome is what became of one delivery attempt.
type Outcome uint8

const (
	// Delivered removes the delivery (pending or dead) for good.
	Delivered Outcome = iota
	// Retry keeps the delivery pending with its new state.
	Retry
	// Dead moves the delivery from pending to the dead letters.
	Dead
)

// Change is what one Settle did to the counts of Stats, at d.Target.
type Change struct {
	PendingEvents int
	Pending       int
	Dead          int
}

// Stats are counts kept by the store, read when an engine starts.
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

// Backlog is a snapshot of a store's deliveries: writes made after it was
// taken are not in it. Close it soon: a bbolt snapshot keeps the pages it
// reads from being reused, and the store's Close waits for it.
type Backlog interface {
	// PendingEvents is the number of events owed to at least one target.
	// It is kept as a count, not counted.
	PendingEvents() int
	// Targets returns the names of the targets with pending deliveries.
	Targets() []string
	// DeadTargets returns the names of the targets with dead letters.
	DeadTargets() []string
	// Dead returns the dead-letter count of each target that has any.
	Dead() (map[string]int, error)
	// Pending calls fn for every pending delivery, target by target,
	// oldest event first.
	Pending(fn func(d *Delivery) error) error
	Close() error
}

// Store is the durable state of one relay. Every method is safe for
// concurrent use. Methods that change state return only once the change is
// durable (for stores that are durable at all).
type Store interface {
	// Accept stores ev with one pending delivery per target, due now, and
	// records ev.ID as a dedupe key until keyExpiry (zero: record no key).
	// If the key is already recorded and unexpired at now, or an event with
	// the same id is still stored, nothing is written and dup is true.
	Accept(ev *Event, targets []string, keyExpiry, now time.Time) (dup bool, err error)
	// Seen reports whether id is a recorded, unexpired key or a stored event.
	Seen(id ID, now time.Time) (bool, error)
	// Event returns a stored event.
	Event(id ID) (*Event, error)
	// Settle records the outcome of an attempt on d and returns what
	// changed. Settling a delivery that no longer exists (deleted
	// meanwhile) changes nothing and is not an error. Delivered also
	// removes a dead letter of the same (event, target), which a config
	// reload may have made of a delivery while its attempt was under way.
	Settle(d *Delivery, o Outcome) (Change, error)
	// SettleLater is Settle without waiting: then gets what Settle would
	// return once the outcome is durable (or failed), possibly from another
	// goroutine and after a few milliseconds in which other writes may join
	// it. then must not block.
	SettleLater(d *Delivery, o Outcome, then func(Change, error))
	// Backlog takes a snapshot of the pending deliveries and dead-letter
	// counts, for an engine to load while the store takes writes.
	Backlog() (Backlog, error)
	// OldestPending returns the receipt time of the oldest event pending at
	// target; ok is false when none is.
	OldestPending(target string) (t time.Time, ok bool, err error)
	// KillTarget moves every pending delivery of target to the dead
	// letters with reason as the last error. It returns how many moved, and
	// how many events that left with nothing pending.
	KillTarget(target, reason string, now time.Time) (moved, settled int, err error)
	// DeadLetters lists dead letters, at one target or all (target ""),
	// in a stable order, resuming after cursor ("" for the start).
	DeadLetters(target, cursor string, limit int) (list []DeadLetter, next string, err error)
	// Replay moves dead letters back to pending, due now with no attempts
	// made, and returns them. Empty ids means every event; empty target
	// every target; keep, if not nil, filters which targets may be replayed.
	// revived counts the events that had nothing pending before.
	Replay(ids []ID, target string, keep func(target string) bool, now time.Time) (moved []Delivery, revived int, err error)
	// DeleteDead deletes the dead letters of id at target (every target if
	// ""), and the event once nothing references it. It returns how many
	// dead letters it deleted, per target.
	DeleteDead(id ID, target string) (map[string]int, error)
	// ExpireKeys forgets dedupe keys whose expiry is not after now and
	// returns how many it forgot.
	ExpireKeys(now time.Time) (int, error)
	// Stats returns the counts kept by the store.
	Stats(now time.Time) (Stats, error)
	// Close releases the store. It is safe to call more than once.
	Close() error
}

// ForEachPending calls fn for every delivery pending in s now: a backlog
// taken, read and closed.
func ForEachPending(s Store, fn func(d *Delivery) error) error {
	b, err := s.Backlog()
	if err != nil {
		return err
	}
	return errors.Join(b.Pending(fn), b.Close())
}
