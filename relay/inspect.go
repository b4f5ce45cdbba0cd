package relay

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// outcomeSpace remembers, per (target, event), an outcome that leaves no
// trace in the store once its delivery is gone and that Event could not
// tell from a delivery: stale (dropped, never sent). Delivered needs no
// record: a configured target that the event matched and that holds
// nothing of it delivered it. Records expire with the dedupe ttl, as the
// event's key does.
const outcomeSpace = "outcome"

// outcomeStale is the value of a stale outcome record.
var outcomeStale = []byte("stale")

func outcomeKey(target string, id store.ID) string { return target + "\x00" + id.String() }

// ErrUnknownEvent is returned by Event when the relay holds no trace of
// the event: not stored, and its dedupe key not (or no longer) recorded.
var ErrUnknownEvent = errors.New("no such event")

// What became of an event at one target (EventTarget.State).
const (
	StatePending   = "pending"    // still owed: attempts and the next attempt in Delivery
	StateDead      = "dead"       // a dead letter: its error in Delivery
	StateDelivered = "delivered"  // sent and acknowledged
	StateStale     = "stale"      // not sent: older than one delivered for its drop_stale key
	StateNotRouted = "not_routed" // the target's match lines do not take it
)

// EventStatus is one event and where it stands at every target.
type EventStatus struct {
	ID store.ID
	// Event is the event as received; nil when it is no longer stored
	// (delivered, or dropped, everywhere) and only its dedupe key is
	// left: its body is no longer kept.
	Event *store.Event
	// Targets are sorted by name: every target of the config, and every
	// other target that holds the event pending or dead.
	Targets []EventTarget
}

// EventTarget is where an event stands at one target.
type EventTarget struct {
	Target     string
	Configured bool
	State      string
	// Delivery is the delivery as stored, for StatePending and StateDead:
	// attempts, first and last attempt, last status and error, and for a
	// pending one its next attempt.
	Delivery *store.Delivery
}

// Event returns the event with id and its state at every target, or
// ErrUnknownEvent.
func (e *Engine) Event(ctx context.Context, id store.ID) (EventStatus, error) {
	st, err := e.openStore()
	if err != nil {
		return EventStatus{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, adminTimeout)
	defer cancel()
	cfg := e.Config()
	out := EventStatus{ID: id}
	es, err := st.Lookup(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		// Gone from the store: if its key is still recorded, every
		// target it was owed to settled it (a dead letter stays stored).
		seen, err := st.Seen(ctx, id, e.now())
		if err != nil {
			return out, fmt.Errorf("looking up event %s: %w", id, err)
		}
		if !seen {
			return out, fmt.Errorf("%w: %s", ErrUnknownEvent, id)
		}
		for _, tc := range cfg.Targets {
			state, err := e.settledState(ctx, st, tc.Name, id)
			if err != nil {
				return out, err
			}
			out.Targets = append(out.Targets, EventTarget{Target: tc.Name, Configured: true, State: state})
		}
		sort.Slice(out.Targets, func(i, j int) bool { return out.Targets[i].Target < out.Targets[j].Target })
		return out, nil
	}
	if err != nil {
		return out, fmt.Errorf("looking up event %s: %w", id, err)
	}
	out.Event = es.Event
	seen := map[string]bool{}
	for i := range es.Pending {
		d := es.Pending[i]
		seen[d.Target] = true
		out.Targets = append(out.Targets, EventTarget{Target: d.Target, State: StatePending, Delivery: &d})
	}
	for i := range es.Dead {
		d := es.Dead[i].Delivery
		if seen[d.Target] {
			continue // a reload's dead letter of a delivery pending again: pending is what happens next
		}
		seen[d.Target] = true
		out.Targets = append(out.Targets, EventTarget{Target: d.Target, State: StateDead, Delivery: &d})
	}
	configured := map[string]bool{}
	for i := range cfg.Targets {
		tc := &cfg.Targets[i]
		configured[tc.Name] = true
		if seen[tc.Name] {
			continue
		}
		state := StateNotRouted
		if tc.Matches(es.Event.Body) {
			if state, err = e.settledState(ctx, st, tc.Name, id); err != nil {
				return out, err
			}
		}
		out.Targets = append(out.Targets, EventTarget{Target: tc.Name, State: state})
	}
	for i := range out.Targets {
		out.Targets[i].Configured = configured[out.Targets[i].Target]
	}
	sort.Slice(out.Targets, func(i, j int) bool { return out.Targets[i].Target < out.Targets[j].Target })
	return out, nil
}

// settledState is what became of an event at a target that holds
// nothing of it: stale if recorded so, delivered otherwise.
func (e *Engine) settledState(ctx context.Context, st store.Store, target string, id store.ID) (string, error) {
	_, _, err := st.State(ctx, outcomeSpace, outcomeKey(target, id), e.now())
	switch {
	case err == nil:
		return StateStale, nil
	case errors.Is(err, store.ErrNotFound):
		return StateDelivered, nil
	}
	return "", fmt.Errorf("reading the outcome of event %s at %s: %w", id, target, err)
}

// recordStale records that the event of d was dropped at t as stale,
// before the delivery is settled: the record outlives the delivery, and
// Event reads it. A store that cannot take it only costs Event's answer
// (delivered instead of stale).
func (e *Engine) recordStale(t *target, d *store.Delivery) {
	ctx, cancel := context.WithTimeout(e.ctx, breakerWriteTimeout)
	defer cancel()
	_, err := e.st.SetState(ctx, outcomeSpace, outcomeKey(t.name, d.ID), outcomeStale, 0, e.now().Add(e.keyTTL()))
	if err != nil && !errors.Is(err, store.ErrConflict) && e.ctx.Err() == nil && e.logEvery(&e.outcomeLogged, 10*time.Second) {
		e.log.Warn("could not record a stale outcome: the event shows as delivered",
			zap.String("event_id", d.ID.String()), zap.String("target", t.name), zap.Error(err))
	}
}

// Pending lists the deliveries still owed, at one target or all (target
// ""), paged as DeadLetters are. ErrUnknownTarget for a target neither
// configured nor holding anything.
func (e *Engine) Pending(ctx context.Context, target, cursor string, limit int) ([]store.Delivery, string, error) {
	st, err := e.openStore()
	if err != nil {
		return nil, "", err
	}
	ctx, cancel := context.WithTimeout(ctx, adminTimeout)
	defer cancel()
	if target != "" {
		if err := e.checkTarget(ctx, target); err != nil {
			return nil, "", err
		}
	}
	return st.ListPending(ctx, target, cursor, limit)
}

// checkTarget returns ErrUnknownTarget unless target is configured or
// holds deliveries (pending or dead) in the store.
func (e *Engine) checkTarget(ctx context.Context, target string) error {
	e.mu.RLock()
	_, ok := e.targets[target]
	e.mu.RUnlock()
	if ok {
		return nil
	}
	counts, err := e.counts(ctx)
	if err != nil {
		return err
	}
	if c, ok := counts.Targets[target]; ok && c.Pending+c.Dead > 0 {
		return nil
	}
	return fmt.Errorf("%w: %q", ErrUnknownTarget, target)
}

// deletePage is how many dead letters DeleteDeadLetters reads at a time.
const deletePage = 500

// DeleteDeadLetters deletes dead letters, selected as Replay selects
// them: empty ids means every event, empty target every target. It
// returns how many it deleted.
func (e *Engine) DeleteDeadLetters(ctx context.Context, ids []store.ID, target string) (int, error) {
	st, err := e.openStore()
	if err != nil {
		return 0, err
	}
	n := 0
	if len(ids) > 0 {
		for _, id := range ids {
			m, err := st.DeleteDead(ctx, id, target)
			n += m
			if err != nil {
				return n, fmt.Errorf("deleting the dead letters of %s: %w", id, err)
			}
		}
		return n, nil
	}
	cursor := ""
	for {
		list, next, err := st.DeadLetters(ctx, target, cursor, deletePage)
		if err != nil {
			return n, fmt.Errorf("listing dead letters: %w", err)
		}
		for _, dl := range list {
			m, err := st.DeleteDead(ctx, dl.ID, dl.Target)
			n += m
			if err != nil {
				return n, fmt.Errorf("deleting the dead letter of %s at %s: %w", dl.ID, dl.Target, err)
			}
		}
		if next == "" {
			return n, nil
		}
		cursor = next
	}
}
