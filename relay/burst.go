package relay

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// A burst hold lets acks run ahead of deliveries while a burst lasts.
// On a saturated CPU an inbound event and its outbound delivery cost
// about the same, so a burst acked at the same time as it is delivered
// is acked at half the speed the relay can ack it. While the relay's CPU
// is saturated and requests queue in Receive, and until they stop
// queueing, every target runs at most an eighth of its concurrency (at
// least one attempt): the rest of the CPU goes to acks, and the
// deliveries not made wait in the store.
//
// The bound: a hold lasts at most Config.BurstHold (10 s by default), so
// acks run ahead of deliveries by at most that long of arrivals. After a
// hold no other begins until what piled up during it is delivered (or
// dead-lettered), or ten minutes have passed: under a load that does not
// end, deliveries run at their full concurrency and get the CPU they
// need to follow the arrivals, and the backlog drains at the drain rate.

const (
	// burstTick is how often the hold looks at the CPU and the intake.
	burstTick = 100 * time.Millisecond
	// burstTicks of saturation start a hold, and as many of calm end
	// it: a burst, not a blip.
	burstTicks = 3
	// burstCPU is the share of the CPUs the process may use that counts
	// as saturated, and burstQueue how many Receives in flight on
	// average mean that requests wait (at 1,000/s about 0.5 are; in a
	// burst of 64 connections 20-40). Below burstCalm the burst is over.
	burstCPU   = 0.8
	burstQueue = 4.0
	burstCalm  = 1.0
	// burstShare: during a hold a target runs 1/burstShare of its
	// concurrency, at least one attempt.
	burstShare = 8
	// burstOwedFor is the longest a hold's backlog keeps another hold
	// from starting (on a shared store other instances settle some of
	// it, which this one does not count).
	burstOwedFor = 10 * time.Minute
)

// DefaultBurstHold is the longest a burst hold lasts.
const DefaultBurstHold = 10 * time.Second

// burstHold is the engine's hold state; see the top.
type burstHold struct {
	// inReceive is the sum of the ns spent in Receive, for its average
	// concurrency (Little's law).
	inReceive atomic.Int64
	// queued and settled count deliveries: queued by accepted events,
	// settled for good (delivered, dead or dropped).
	queued, settled atomic.Int64

	mu      sync.Mutex
	held    chan struct{} // closed when the current hold ends; nil: none
	holdMax time.Duration

	// The sampler's own.
	hot, calm int
	since     time.Time // of the current hold, or of the last one's end
	owedFrom  int64     // queued-settled at the hold's start
	owing     bool
	lastCPU   time.Duration
	lastIn    int64
	lastAt    time.Time
}

// current reports the hold's channel, nil when there is none.
func (b *burstHold) current() chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.held
}

// enter waits, while a hold lasts and t runs its share already, for the
// hold to end or ctx to be done; it reports whether t may attempt (the
// caller then calls leave).
func (b *burstHold) enter(ctx context.Context, t *target) bool {
	for {
		held := b.current()
		n := t.attempting.Add(1)
		if held == nil || n <= int64(max(1, t.cfg.Load().Concurrency/burstShare)) {
			return true
		}
		t.attempting.Add(-1)
		select {
		case <-held:
		case <-ctx.Done():
			return false
		}
	}
}

func (b *burstHold) leave(t *target) { t.attempting.Add(-1) }

// sample looks at the last tick and starts or ends a hold; it reports a
// change (true, held) for the log.
func (b *burstHold) sample(now time.Time, cpu time.Duration, procs int) (changed, held bool) {
	in := b.inReceive.Load()
	if b.lastAt.IsZero() {
		b.lastAt, b.lastCPU, b.lastIn, b.since = now, cpu, in, now
		return false, false
	}
	wall := now.Sub(b.lastAt)
	if wall <= 0 {
		return false, false
	}
	busy := float64(cpu-b.lastCPU) / float64(wall) / float64(procs)
	queue := float64(in-b.lastIn) / float64(wall)
	b.lastAt, b.lastCPU, b.lastIn = now, cpu, in
	if busy >= burstCPU && queue >= burstQueue {
		b.hot++
	} else {
		b.hot = 0
	}
	// A hold ends with the burst, not with a dip of the CPU: held
	// deliveries leave it idle while acks wait for the log.
	if queue < burstCalm {
		b.calm++
	} else {
		b.calm = 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	backlog := b.queued.Load() - b.settled.Load()
	if b.held == nil {
		if b.owing && (backlog <= b.owedFrom || now.Sub(b.since) >= burstOwedFor) {
			b.owing = false
		}
		if b.holdMax <= 0 || b.owing || b.hot < burstTicks {
			return false, false
		}
		b.held, b.since, b.owedFrom = make(chan struct{}), now, backlog
		return true, true
	}
	if b.calm < burstTicks && now.Sub(b.since) < b.holdMax {
		return false, true
	}
	b.release(now)
	return true, false
}

// release ends the current hold; b.mu is held.
func (b *burstHold) release(now time.Time) {
	close(b.held)
	b.held, b.since, b.owing = nil, now, true
}

// setMax sets the longest hold; 0 or less turns holds off (and ends one).
func (b *burstHold) setMax(d time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.holdMax = d
	if d <= 0 && b.held != nil {
		b.release(time.Now())
	}
}

// watchBursts runs the hold's sampler until the engine closes.
func (e *Engine) watchBursts() {
	defer e.wg.Done()
	tick := time.NewTicker(burstTick)
	defer tick.Stop()
	for {
		select {
		case <-e.ctx.Done():
			e.burst.setMax(0)
			return
		case <-tick.C:
		}
		changed, held := e.burst.sample(time.Now(), processCPU(), runtime.GOMAXPROCS(0))
		if !changed {
			continue
		}
		if held {
			e.burstBegan()
		} else {
			e.log.Info("burst over: deliveries at full concurrency")
		}
	}
}

// burstBegan sends the workers waiting in a queue back to the gate, as a
// pause does: else each would take one more delivery.
func (e *Engine) burstBegan() {
	e.mu.RLock()
	for _, t := range e.targets {
		t.lookAgain(e.ctx)
	}
	e.mu.RUnlock()
	e.log.Info("burst: deliveries held to their share while acks catch up")
}
