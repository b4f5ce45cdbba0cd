package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// A paused target gets no attempts: its workers wait at the pause gate,
// in front of the breaker and the queue, holding no lease, so waiting
// uses no attempt and dead-letters nothing. The pause is the relay's, and
// lasts until resumed: a record in the store's key states (space
// pauseSpace, key the target's name) that outlives restarts, reloads and
// removals of the target from the config, and that every instance reads
// again once a pauseSync (syncPauses). Until a target's record has been
// read once, its gate stays shut: a restart never sends a paused target
// anything. max_age still applies: while a target is paused, deliveries
// past it are dead-lettered by a sweep (expirePaused).
const (
	pauseSpace = "pause"
	pauseSync  = time.Second
	// pauseKeep: a pause has no end of its own.
	pauseKeep = 100 * 365 * 24 * time.Hour
	// resumeKeep: a resumed record only has to reach the other instances;
	// once it expires, no record reads as not paused too.
	resumeKeep = breakerKeep
	// sweepTake bounds the wait for a due delivery in a sweep: none due
	// within it means the sweep has seen them all.
	sweepTake = 100 * time.Millisecond
	// sweepBudget bounds one sweep, so that a large backlog is swept over
	// several rounds.
	sweepBudget = 2 * time.Second
)

// ErrUnknownTarget is returned for a target the relay's config does not
// have (and, where the store's deliveries count, that holds none).
var ErrUnknownTarget = errors.New("no such target")

// pauseRecord is a target's shared pause state.
type pauseRecord struct {
	Paused bool  `json:"paused"`
	At     int64 `json:"at"` // unix ns of the pause or resume
}

// pauseGate is a target's pause state on this instance.
type pauseGate struct {
	mu      sync.Mutex
	known   bool // the store's record was read once
	paused  bool
	changed chan struct{}

	sweeping  atomic.Bool
	lastSweep atomic.Int64 // unix ns
}

func newPauseGate() *pauseGate { return &pauseGate{changed: make(chan struct{})} }

// wait blocks until the target may take a delivery: its pause state is
// known and it is not paused. It returns false when ctx is done.
func (g *pauseGate) wait(ctx context.Context) bool {
	for {
		g.mu.Lock()
		if g.known && !g.paused {
			g.mu.Unlock()
			return true
		}
		changed := g.changed
		g.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return false
		}
	}
}

// open reports whether the target may take a delivery now.
func (g *pauseGate) open() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.known && !g.paused
}

// isPaused reports whether the target is known to be paused.
func (g *pauseGate) isPaused() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.known && g.paused
}

// set adopts a pause state read from or written to the store. It
// reports whether that changed what the gate knew, and whether the gate
// knew anything before.
func (g *pauseGate) set(paused bool) (changed, wasKnown bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	changed, wasKnown = !g.known || g.paused != paused, g.known
	g.known, g.paused = true, paused
	if changed {
		close(g.changed)
		g.changed = make(chan struct{})
	}
	return changed, wasKnown
}

// Pause stops every attempt at target, relay-wide, until Resume: attempts
// under way finish; the target's deliveries wait, using no attempt, or
// become dead letters once past its max_age. Pausing a paused target
// changes nothing. ErrUnknownTarget when the config has no such target.
func (e *Engine) Pause(ctx context.Context, target string) error {
	return e.setPause(ctx, target, true)
}

// Resume lets a paused target's deliveries go again, relay-wide.
// ErrUnknownTarget when the config has no such target.
func (e *Engine) Resume(ctx context.Context, target string) error {
	return e.setPause(ctx, target, false)
}

func (e *Engine) setPause(ctx context.Context, name string, paused bool) error {
	e.mu.RLock()
	open := e.state == stateOpen
	t := e.targets[name]
	e.mu.RUnlock()
	if !open {
		return ErrUnavailable
	}
	if t == nil {
		return fmt.Errorf("%w: %q", ErrUnknownTarget, name)
	}
	ctx, cancel := context.WithTimeout(ctx, adminTimeout)
	defer cancel()
	// Held while the record is written and adopted, so that a sync that
	// read it just before cannot undo the change here.
	e.pauseMu.Lock()
	defer e.pauseMu.Unlock()
	var err error
	for range 5 {
		now := e.now()
		var rev uint64
		if _, rev, err = e.readPause(ctx, name, now); err != nil {
			break
		}
		v, _ := json.Marshal(pauseRecord{Paused: paused, At: now.UnixNano()})
		keep := resumeKeep
		if paused {
			keep = pauseKeep
		}
		if _, err = e.st.SetState(ctx, pauseSpace, name, v, rev, now.Add(keep)); !errors.Is(err, store.ErrConflict) {
			break
		}
	}
	if err != nil {
		verb := map[bool]string{true: "pausing", false: "resuming"}[paused]
		return fmt.Errorf("%s target %s: %w", verb, name, err)
	}
	e.adoptPause(t, paused)
	return nil
}

// readPause returns target's shared pause state and its revision (0:
// none, not paused).
func (e *Engine) readPause(ctx context.Context, name string, now time.Time) (bool, uint64, error) {
	v, rev, err := e.st.State(ctx, pauseSpace, name, now)
	if errors.Is(err, store.ErrNotFound) {
		return false, 0, nil
	}
	if err != nil {
		return false, 0, err
	}
	var rec pauseRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return false, rev, nil // unreadable: not paused, and written over by the next change
	}
	return rec.Paused, rev, nil
}

// adoptPause applies a pause state to t on this instance, and logs a
// change. e.pauseMu is held.
func (e *Engine) adoptPause(t *target, paused bool) {
	changed, wasKnown := t.pause.set(paused)
	if !changed {
		return
	}
	switch {
	case paused:
		// Workers waiting in the queue come back to the gate.
		t.lookAgain(e.ctx)
		e.log.Info("target paused: its deliveries wait until it is resumed", zap.String("target", t.name))
	case wasKnown:
		e.log.Info("target resumed: its deliveries go out again", zap.String("target", t.name))
	}
}

// pokePauses makes syncPauses read the pause records now (a target was
// added, and its gate stays shut until its record is read).
func (e *Engine) pokePauses() {
	select {
	case e.pausePoke <- struct{}{}:
	default:
	}
}

// syncPauses reads every target's pause record at once, then once a
// pauseSync (or when poked), adopts what it says, and sweeps the paused
// targets for deliveries past max_age.
func (e *Engine) syncPauses() {
	defer e.wg.Done()
	tick := time.NewTicker(pauseSync)
	defer tick.Stop()
	for {
		e.mu.RLock()
		targets := make([]*target, 0, len(e.targets))
		for _, t := range e.targets {
			targets = append(targets, t)
		}
		e.mu.RUnlock()
		anyPaused := false
		for _, t := range targets {
			e.syncPause(t)
			anyPaused = anyPaused || t.pause.isPaused()
		}
		if anyPaused {
			e.sweepPaused(targets)
		}
		select {
		case <-e.ctx.Done():
			return
		case <-tick.C:
		case <-e.pausePoke:
		}
	}
}

// syncPause reads t's pause record and adopts it. A store that cannot
// answer leaves t as it was (shut, if never read: on a shared store that
// lost its server nothing could be taken anyway).
func (e *Engine) syncPause(t *target) {
	e.pauseMu.Lock()
	defer e.pauseMu.Unlock()
	ctx, cancel := context.WithTimeout(e.ctx, breakerWriteTimeout)
	defer cancel()
	paused, _, err := e.readPause(ctx, t.name, e.now())
	if err != nil {
		if e.ctx.Err() == nil && e.logEvery(&e.pauseLogged, 10*time.Second) {
			e.log.Warn("could not read a target's pause state", zap.String("target", t.name), zap.Error(err))
		}
		return
	}
	e.adoptPause(t, paused)
}

// sweepPaused starts a sweep of every paused target whose oldest pending
// event is past its max_age, at most once a sweepEvery.
func (e *Engine) sweepPaused(targets []*target) {
	ctx, cancel := context.WithTimeout(e.ctx, breakerWriteTimeout)
	counts, err := e.st.Counts(ctx)
	cancel()
	if err != nil {
		return
	}
	now := e.now()
	for _, t := range targets {
		c, tc := counts.Targets[t.name], t.cfg.Load()
		if !t.pause.isPaused() || c.Pending == 0 || c.OldestPending.IsZero() || now.Sub(c.OldestPending) <= tc.MaxAge {
			continue
		}
		if now.UnixNano()-t.pause.lastSweep.Load() < int64(sweepEvery(tc.MaxAge)) || !t.pause.sweeping.CompareAndSwap(false, true) {
			continue
		}
		t.pause.lastSweep.Store(now.UnixNano())
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			defer t.pause.sweeping.Store(false)
			e.expirePaused(t, c.Pending)
		}()
	}
}

// sweepEvery is how often a paused target is swept: a dead letter for
// max_age may come that much late, and a sweep goes through the
// target's due deliveries.
func sweepEvery(maxAge time.Duration) time.Duration {
	return min(max(maxAge/10, pauseSync), time.Minute)
}

// expirePaused dead-letters a paused target's deliveries past max_age,
// taking each due delivery once, at most n of them: one past max_age is
// settled dead as an attempt would; any other is put back due now, which
// sends it behind the deliveries not yet seen, so that the sweep goes
// round the queue once. The sweep ends when the target is resumed, when
// no delivery is due, or when it takes a delivery it put back itself.
func (e *Engine) expirePaused(t *target, n int) {
	start := e.now()
	deadline := time.Now().Add(sweepBudget)
	for range n {
		if !t.pause.isPaused() || time.Now().After(deadline) {
			return
		}
		ctx, cancel := context.WithTimeout(e.ctx, sweepTake)
		l, err := t.q.Take(ctx)
		cancel()
		if err != nil {
			return
		}
		tc := t.cfg.Load()
		d := l.Delivery()
		now := e.now()
		if now.Sub(d.ReceivedAt) > tc.MaxAge {
			d.LastError = ReasonMaxAgeExceeded
			d.LastAttemptAt = now
			e.settle(t, tc, l, &d, store.Dead)
			continue
		}
		l.Postpone(now)
		if !d.NextAt.Before(start) {
			return // round the queue
		}
	}
}
