// Package store keeps the relay's durable state behind one interface, so
// that the engine never knows which backend it runs on. A Store plays five
// roles, each an interface of its own below:
//
//   - Intake: events in, with dedupe (Accept, Seen, ExpireKeys);
//   - Queues: one delivery queue per target; a worker takes the next due
//     delivery as a Lease, makes its attempt, and settles it (delivered,
//     retry at a time, dead) or postpones it without using an attempt;
//   - DeadLetters: list, replay, delete;
//   - KeyStates: small per-key records with a revision and an expiry, for
//     features that remember something per event key (ordering, newest
//     status wins);
//   - Counter: the counts behind the relay's gauges, kept by the store
//     alone.
//
// Three backends keep this contract, checked by one suite
// (relay/store/storetest): Bolt (a bbolt file, group-committed, the
// default), Memory (not durable) and natsstore.Store (NATS JetStream,
// shared by several instances). Bolt and Memory serve their queues from
// memory (localQueue) and load them from the file at open; JetStream owns
// its pending set and redelivery itself.
//
// An event is kept while at least one target still owes a delivery or holds
// it as a dead letter; its dedupe key outlives it until the key expires.
// Every method that changes state returns only once the change is durable
// (for stores that are durable at all), except Lease.Settle, which reports
// durability through its callback.
package store

import (
	"context"
	"encoding/hex"
	"errors"
	"time"
)

// Sentinel errors callers branch on.
var (
	// ErrClosed is returned by every method once Close has been called.
	ErrClosed = errors.New("store closed")
	// ErrNotFound is returned when an event or a key state is not in the
	// store.
	ErrNotFound = errors.New("not found")
	// ErrFull is returned by Accept when the relay already has
	// AcceptOptions.MaxPending events pending.
	ErrFull = errors.New("too many events pending")
	// ErrConflict is returned by SetState when the record's revision is
	// not the one given.
	ErrConflict = errors.New("revision conflict")
	// ErrTooLarge is returned by Accept for an event the store can never
	// hold (a body over a NATS server's max_payload): retrying cannot help.
	ErrTooLarge = errors.New("event too large for the store")
	// ErrUnavailable wraps the errors of a store that cannot take writes
	// now but may later (a shared store that lost its server).
	ErrUnavailable = errors.New("store unavailable")
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
	// Attempts made so far (counted by the relay, never by a backend's own
	// redelivery count: a delivery put back to wait uses none).
	Attempts int
	// NextAt is when the next attempt is due (pending deliveries only).
	NextAt time.Time
	// OrderKey is the delivery's order key, "" for none (QueueOptions).
	OrderKey       string
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
	// Delivered removes the delivery for good, and a dead letter of the
	// same (event, target) too: a reload may have made one of the
	// delivery while its attempt was under way.
	Delivered Outcome = iota
	// Retry keeps the delivery pending with its new state, due at NextAt.
	Retry
	// Dead moves the delivery to the dead letters.
	Dead
)

func (o Outcome) String() string {
	switch o {
	case Delivered:
		return "delivered"
	case Retry:
		return "retry"
	case Dead:
		return "dead"
	}
	return "unknown"
}

// Store is the durable state of one relay. Every method is safe for
// concurrent use.
type Store interface {
	Intake
	Queues
	DeadLetters
	KeyStates
	Counter
	Inspector
	// Close releases the store. Leases still held are abandoned: their
	// deliveries are taken again after a restart (or, on a shared store,
	// by another instance). Safe to call more than once.
	Close() error
}

// AcceptOptions are the limits of one Accept.
type AcceptOptions struct {
	// KeyExpiry is when ev.ID stops counting as seen; zero records no key.
	KeyExpiry time.Time
	// MaxPending: when above zero and the relay already has that many
	// events pending (owed to at least one target), an event with targets
	// gets ErrFull and nothing is written.
	MaxPending int
	// OrderKeys, when not nil, runs parallel to the targets: the order key
	// of the event's delivery at each ("" for none). See QueueOptions.
	OrderKeys []string
}

// Intake takes events in.
type Intake interface {
	// Accept stores ev with one delivery per target, due at ev.ReceivedAt,
	// and records ev.ID as a dedupe key until opts.KeyExpiry. If the key
	// is recorded and unexpired at ev.ReceivedAt, or an event with the
	// same id is still stored, nothing is written and dup is true: dup is
	// only ever reported for an event that is itself durable. ctx bounds
	// the wait for a shared store's acknowledgement.
	Accept(ctx context.Context, ev *Event, targets []string, opts AcceptOptions) (dup bool, err error)
	// Seen reports whether id is a recorded key unexpired at now, or a
	// stored event.
	Seen(ctx context.Context, id ID, now time.Time) (bool, error)
	// ExpireKeys forgets dedupe keys and key states whose expiry is not
	// after now, and returns how many dedupe keys it forgot. A store whose
	// backend expires them itself returns 0.
	ExpireKeys(ctx context.Context, now time.Time) (int, error)
}

// QueueOptions are a target's settings that its queue needs.
type QueueOptions struct {
	// Lease is how long a taken delivery stays leased without Extend
	// before a shared store hands it to someone else: the attempt's
	// timeout plus a margin. Stores of one process keep a lease until it
	// is settled or the process ends, and ignore it.
	Lease time.Duration
	// Ordered: deliveries with the same non-empty order key are handed
	// out one at a time, in queue order (the order they were accepted; a
	// replayed dead letter goes behind what is pending for its key). A
	// delivery is not taken while an earlier one with its key is pending
	// at the target: leased, waiting for a retry, or due. Deliveries
	// without a key, and other keys, are not held back. When false,
	// order keys are kept but ignored. Relay-wide on a shared store.
	Ordered bool
}

// Queues holds one delivery queue per target.
type Queues interface {
	// Queue returns target's queue, opening it on first use; calling it
	// again applies new options. Deliveries are queued for a target
	// whether or not its queue was asked for.
	Queue(target string, opts QueueOptions) (Queue, error)
	// Retire says that this instance's config no longer has target: its
	// queue stops handing out deliveries (Take returns ErrClosed) and a
	// lease still held may yet be settled. A store of one instance makes
	// the target's pending deliveries dead letters with reason as their
	// last error (nobody else will deliver them) and returns how many; a
	// shared store leaves them for the instances that still have the
	// target, and returns 0.
	Retire(ctx context.Context, target, reason string) (int, error)
}

// Queue is one target's pending deliveries.
type Queue interface {
	// Take waits until a delivery is due and leases it to the caller: no
	// one else takes it until the lease is settled, postponed or (on a
	// shared store) lapses. It returns ctx's error when ctx is done, and
	// ErrClosed once the store is closed or the target retired.
	// Deliveries whose event is gone are skipped.
	Take(ctx context.Context) (Lease, error)
}

// Lease is one taken delivery.
type Lease interface {
	// Delivery is the delivery as stored when it was taken: the attempts
	// made so far, the first attempt's time, its receipt time.
	Delivery() Delivery
	// Event is the delivery's event.
	Event() *Event
	// Extend keeps the lease from lapsing, for an attempt that runs long.
	Extend(ctx context.Context) error
	// Settle records the outcome of an attempt; d is the delivery with
	// the attempt's state (Attempts, LastStatus, LastError, NextAt for a
	// Retry, ...). It does not wait: then, if not nil, gets nil once the
	// outcome is durable, possibly from another goroutine and after a few
	// milliseconds in which other writes may join it; a retry is due at
	// d.NextAt from then on. On an error the delivery stays pending as
	// last stored and the lease is still held: the caller may Postpone
	// it. then must not block. Settling a delivery that no longer exists
	// (deleted, or retired meanwhile) changes nothing and is not an error.
	Settle(o Outcome, d *Delivery, then func(error))
	// Postpone puts the delivery back, due at at, without using an
	// attempt or changing what is stored of it: waiting for a held or
	// paused target, a rate, or an earlier event of the same key.
	Postpone(at time.Time)
}

// DeadLetters holds the deliveries that could not be made.
type DeadLetters interface {
	// DeadLetters lists dead letters, at one target or all (target ""),
	// in a stable order, resuming after cursor ("" for the start); next is
	// "" on the last page.
	DeadLetters(ctx context.Context, target, cursor string, limit int) (list []DeadLetter, next string, err error)
	// Replay moves dead letters back to pending, due at once with no
	// attempts made, and returns how many moved. Empty ids means every
	// event; empty target every target; keep, if not nil, says which
	// targets may be replayed. Replaying the same dead letter twice (a
	// retried request) queues it once.
	Replay(ctx context.Context, ids []ID, target string, keep func(target string) bool) (int, error)
	// DeleteDead deletes the dead letters of id at target (every target
	// if ""), and the event once nothing references it. It returns how
	// many it deleted.
	DeleteDead(ctx context.Context, id ID, target string) (int, error)
}

// KeyStates are small records per (space, key), each with a revision
// that every write changes, and an expiry after which it is gone: what a
// feature remembers per event key and target, relay-wide.
type KeyStates interface {
	// State returns the record at (space, key) and its revision, or
	// ErrNotFound when there is none unexpired at now.
	State(ctx context.Context, space, key string, now time.Time) (value []byte, rev uint64, err error)
	// SetState writes the record if its revision is rev (0: there is none,
	// or it expired), keeps it until expiry, and returns its new
	// revision; ErrConflict when the revision is another.
	SetState(ctx context.Context, space, key string, value []byte, rev uint64, expiry time.Time) (uint64, error)
}

// Counts are what the relay's gauges show. On a shared store they are the
// relay's, the same on every instance.
type Counts struct {
	// PendingEvents are the events owed to at least one target.
	PendingEvents int
	// Targets has every target with pending deliveries or dead letters.
	Targets map[string]TargetCounts
}

// TargetCounts are one target's counts.
type TargetCounts struct {
	Pending int
	Dead    int
	// OldestPending is the receipt time of the oldest event pending at the
	// target; zero when none is.
	OldestPending time.Time
}

// Counter counts.
type Counter interface {
	// Counts returns the counts now. Stores of one process keep them in
	// memory (a backlog still loading after a restart counts as it
	// loads); a shared store asks its server, at most once a second.
	Counts(ctx context.Context) (Counts, error)
}

// Inspector shows what the store holds, for the admin API, the CLI and
// the console.
type Inspector interface {
	// ListPending lists the deliveries still owed, at one target or all
	// (target ""), with their attempts, last error and next attempt, in
	// a stable order, resuming after cursor ("" for the start); next is
	// "" on the last page.
	ListPending(ctx context.Context, target, cursor string, limit int) (list []Delivery, next string, err error)
	// Lookup returns the event id and what the store holds of it: its
	// deliveries still pending and its dead letters, at every target.
	// ErrNotFound when no event with id is stored (its dedupe key may
	// still be recorded: Seen says).
	Lookup(ctx context.Context, id ID) (EventState, error)
}

// EventState is one stored event and where it stands.
type EventState struct {
	Event   *Event
	Pending []Delivery
	Dead    []DeadLetter
}

// Loader is implemented by stores that load their queues in the
// background after opening: Loaded is closed once every delivery stored
// before the open is queued and counted.
type Loader interface {
	Loaded() <-chan struct{}
}

// Sharer is implemented by stores that several instances use at once;
// Shared reports whether this one is. Features that must hold relay-wide
// (a rate) coordinate through KeyStates only then.
type Sharer interface {
	Shared() bool
}

// Health is implemented by stores that can be up or down while open (a
// shared store and its server): Up reports whether it takes writes now,
// and why not.
type Health interface {
	Up() (bool, error)
}
