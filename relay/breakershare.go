package relay

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// breakerWriteTimeout bounds one read-modify-write of a breaker record.
const breakerWriteTimeout = 2 * time.Second

// readBreaker returns target's shared breaker record and its revision
// (0: none).
func (e *Engine) readBreaker(ctx context.Context, name string, now time.Time) (breakerRecord, uint64, error) {
	var rec breakerRecord
	v, rev, err := e.st.State(ctx, breakerSpace, name, now)
	if errors.Is(err, store.ErrNotFound) {
		return rec, 0, nil
	}
	if err != nil {
		return rec, 0, err
	}
	if err := json.Unmarshal(v, &rec); err != nil {
		return breakerRecord{}, rev, nil // unreadable: start afresh over it
	}
	return rec, rev, nil
}

// shareBreaker applies change to t's shared breaker record with a
// compare-and-set, reading it again after a conflicting write. change
// reports whether to write; shareBreaker returns the record as it ended
// and whether change let it be written. A store that cannot be reached
// leaves each instance with its own breaker (logged, at most every 10 s).
func (e *Engine) shareBreaker(t *target, change func(rec *breakerRecord, now int64) bool) (breakerRecord, bool) {
	ctx, cancel := context.WithTimeout(e.ctx, breakerWriteTimeout)
	defer cancel()
	var err error
	for range 5 {
		now := e.now()
		var rec breakerRecord
		var rev uint64
		if rec, rev, err = e.readBreaker(ctx, t.name, now); err != nil {
			break
		}
		if !change(&rec, now.UnixNano()) {
			return rec, false
		}
		v, _ := json.Marshal(rec)
		var newRev uint64
		newRev, err = e.st.SetState(ctx, breakerSpace, t.name, v, rev, now.Add(breakerKeep))
		if errors.Is(err, store.ErrConflict) {
			// Another writer got there first: read its record and
			// decide again. Losing every round means the record is being
			// kept by the others.
			err = nil
			continue
		}
		if err != nil {
			break
		}
		t.brk.seen(newRev)
		return rec, true
	}
	if err == nil {
		return breakerRecord{}, false
	}
	if e.ctx.Err() == nil && e.logEvery(&e.breakerLogged, 10*time.Second) {
		e.log.Warn("could not share a target's breaker state: instances hold it each on their own",
			zap.String("target", t.name), zap.Error(err))
	}
	return breakerRecord{}, true
}

// claimProbe makes sure no other instance has a probe out at t before
// this one sends its own. It reports whether the probe may go.
func (e *Engine) claimProbe(t *target, tc *TargetConfig) bool {
	probeFor := int64(tc.Timeout + time.Second)
	rec, ok := e.shareBreaker(t, func(rec *breakerRecord, now int64) bool {
		if rec.Held && (rec.ProbeUntil > now || rec.HoldUntil > now) {
			return false
		}
		if !rec.Held {
			// The record lost its trip (expired, or the trip was never
			// written): this instance's breaker is the one in force.
			*rec = t.brk.snapshot()
		}
		rec.ProbeUntil = now + probeFor
		return true
	})
	if !ok {
		t.brk.deferProbe(max(rec.ProbeUntil, rec.HoldUntil))
	}
	return ok
}

// leaveBreaker ends a worker's turn at t's breaker. A probe that asked
// nothing (its delivery expired, or no delivery came before the worker
// was told to look at its settings) lets the next one go at once, here or
// at another instance: the shared record first, since a worker let go
// before it is written would find this probe still out there.
func (e *Engine) leaveBreaker(t *target, probe, asked bool) {
	if probe && !asked {
		e.shareBreaker(t, func(rec *breakerRecord, now int64) bool {
			if !rec.Held {
				return false
			}
			rec.ProbeUntil, rec.HoldUntil = 0, min(rec.HoldUntil, now)
			return true
		})
	}
	t.brk.leave(probe, asked, e.now().UnixNano())
}

// syncBreakers reads every target's shared breaker record once a
// breakerSync and adopts what other instances wrote.
func (e *Engine) syncBreakers() {
	defer e.wg.Done()
	tick := time.NewTicker(breakerSync)
	defer tick.Stop()
	for {
		select {
		case <-e.ctx.Done():
			return
		case <-tick.C:
		}
		e.mu.RLock()
		targets := make([]*target, 0, len(e.targets))
		for _, t := range e.targets {
			targets = append(targets, t)
		}
		e.mu.RUnlock()
		for _, t := range targets {
			ctx, cancel := context.WithTimeout(e.ctx, breakerWriteTimeout)
			rec, rev, err := e.readBreaker(ctx, t.name, e.now())
			cancel()
			if err == nil && rev != 0 {
				t.brk.adopt(rec, rev)
			}
		}
	}
}
