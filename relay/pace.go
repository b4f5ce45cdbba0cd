package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// rateSpace holds, per target with a rate on a shared store, the next
// free request slot of the whole relay (unix ns, 8 bytes big-endian).
const rateSpace = "rate"

// pacer spaces one target's requests to its rate, retries and probes
// included. On this instance an x/time/rate limiter (burst 1) spaces
// them; on a store that several instances share, each request also
// claims the next free slot in a key-state record with compare-and-set,
// so that the instances together keep the rate. One worker at a time
// waits for a slot (the gate), holding the delivery it took: the others
// wait without a lease, so a slow rate never keeps many leases waiting.
type pacer struct {
	gate chan struct{}

	mu       sync.Mutex
	interval time.Duration
	lim      *rate.Limiter
}

func newPacer(r Rate) *pacer {
	p := &pacer{gate: make(chan struct{}, 1)}
	p.set(r)
	return p
}

// set applies a new rate from the next request on.
func (p *pacer) set(r Rate) {
	p.mu.Lock()
	defer p.mu.Unlock()
	iv := r.Interval()
	if iv == p.interval && p.lim != nil {
		return
	}
	p.interval = iv
	if iv <= 0 {
		p.lim = nil
		return
	}
	if p.lim == nil {
		p.lim = rate.NewLimiter(rate.Every(iv), 1)
		return
	}
	p.lim.SetLimit(rate.Every(iv))
}

func (p *pacer) current() (time.Duration, *rate.Limiter) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.interval, p.lim
}

// enter waits for the pacer's gate. held says whether the caller took it
// (without a rate everyone goes through); ok is false when ctx ended.
func (p *pacer) enter(ctx context.Context) (held, ok bool) {
	if iv, _ := p.current(); iv <= 0 {
		return false, true
	}
	select {
	case p.gate <- struct{}{}:
		return true, true
	case <-ctx.Done():
		return false, false
	}
}

// leave gives the gate to the next worker; held says enter took it
// (the rate may have been set meanwhile: leave only what was taken).
func (p *pacer) leave(held bool) {
	if held {
		select {
		case <-p.gate:
		default:
		}
	}
}

// pace holds the caller until its request may go, extending the lease
// while the wait is longer than a good part of it. It returns ctx's error
// if ctx ends first.
func (e *Engine) pace(ctx context.Context, t *target, l store.Lease, lease time.Duration) error {
	iv, lim := t.pace.current()
	if iv <= 0 {
		return nil
	}
	at := e.now()
	if e.shared {
		slot, err := e.claimSlot(ctx, t.name, iv)
		if err == nil {
			at = slot
		} else if ctx.Err() != nil {
			return ctx.Err()
		} else if e.logEvery(&e.rateLogged, 10*time.Second) {
			e.log.Warn("could not claim a request slot relay-wide: this instance keeps the rate on its own",
				zap.String("target", t.name), zap.Error(err))
		}
	}
	if r := lim.ReserveN(at, 1); r.OK() {
		// The limiter counts from at, so a relay-wide slot later than
		// now is not followed by a second one too soon on this instance.
		if d := r.DelayFrom(at); d > 0 {
			at = at.Add(d)
		}
	}
	for {
		d := at.Sub(e.now())
		if d <= 0 {
			return nil
		}
		step := min(d, max(lease/2, time.Millisecond))
		timer := time.NewTimer(step)
		select {
		case <-ctx.Done():
			timer.Stop()
			return ctx.Err()
		case <-timer.C:
		}
		if step < d {
			if err := l.Extend(ctx); err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
		}
	}
}

// claimSlot takes the relay's next free request slot at target: the later
// of now and the record's next slot, and moves the record one interval
// past it.
func (e *Engine) claimSlot(ctx context.Context, target string, interval time.Duration) (time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, breakerWriteTimeout)
	defer cancel()
	var err error
	for range 20 {
		now := e.now()
		var v []byte
		var rev uint64
		v, rev, err = e.st.State(ctx, rateSpace, target, now)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return time.Time{}, err
		}
		slot := now
		if len(v) == 8 {
			if next := time.Unix(0, int64(binary.BigEndian.Uint64(v))); next.After(slot) {
				slot = next
			}
		}
		next := slot.Add(interval)
		var buf [8]byte
		binary.BigEndian.PutUint64(buf[:], uint64(next.UnixNano()))
		// The record outlives its last slot by a minute: after that, no
		// slot it holds is still ahead.
		_, err = e.st.SetState(ctx, rateSpace, target, buf[:], rev, next.Add(time.Minute))
		if err == nil {
			return slot, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return time.Time{}, err
		}
	}
	return time.Time{}, err
}
