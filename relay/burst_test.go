package relay

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// burstFeed drives a burstHold's sampler with made-up ticks: the
// process's CPU and the time spent in Receive over each.
type burstFeed struct {
	b   *burstHold
	now time.Time
	cpu time.Duration
}

func newBurstFeed(max time.Duration) *burstFeed {
	f := &burstFeed{b: &burstHold{}, now: time.Unix(1_800_000_000, 0)}
	f.b.setMax(max)
	f.b.sample(f.now, 0, 1)
	return f
}

// tick runs one tick with busy of the one CPU used and queue Receives in
// flight on average, and reports whether a hold is on after it.
func (f *burstFeed) tick(busy, queue float64) bool {
	f.now = f.now.Add(burstTick)
	f.cpu += time.Duration(busy * float64(burstTick))
	f.b.inReceive.Add(int64(queue * float64(burstTick)))
	_, held := f.b.sample(f.now, f.cpu, 1)
	if (f.b.current() != nil) != held {
		panic("sample and current disagree")
	}
	return held
}

func burstTarget(concurrency int) *target {
	t := &target{name: "t"}
	t.cfg.Store(&settings{TargetConfig: TargetConfig{Concurrency: concurrency}})
	return t
}

func TestBurstHoldStartsWithASaturatedIntakeAndEndsWithIt(t *testing.T) {
	f := newBurstFeed(DefaultBurstHold)
	for i := range burstTicks - 1 {
		if f.tick(0.95, 30) {
			t.Fatalf("held after %d saturated ticks; a hold needs %d", i+1, burstTicks)
		}
	}
	if !f.tick(0.95, 30) {
		t.Fatalf("no hold after %d saturated ticks", burstTicks)
	}

	// Held: a target of concurrency 16 runs 2 attempts, the third waits.
	tg := burstTarget(16)
	ctx := context.Background()
	for i := range 2 {
		if !f.b.enter(ctx, tg) {
			t.Fatalf("attempt %d of the share refused", i+1)
		}
	}
	third := make(chan bool)
	go func() { third <- f.b.enter(ctx, tg) }()
	// The CPU dips while deliveries are held: the hold stays while
	// requests still queue.
	for range 2 * burstTicks {
		if !f.tick(0.5, 25) {
			t.Fatal("hold ended while requests still queue in Receive")
		}
	}
	select {
	case <-third:
		t.Fatal("a third attempt ran during the hold; the share of 16 is 2")
	default:
	}
	for i := range burstTicks {
		held := f.tick(0.5, 0.2)
		if want := i < burstTicks-1; held != want {
			t.Fatalf("calm tick %d: held %v, want %v", i+1, held, want)
		}
	}
	if !<-third {
		t.Fatal("the waiting attempt was refused when the hold ended")
	}
	if n := tg.attempting.Load(); n != 3 {
		t.Fatalf("%d attempts counted, want 3", n)
	}
	for range 3 {
		f.b.leave(tg)
	}
	// Without a hold every worker enters.
	for i := range 16 {
		if !f.b.enter(ctx, tg) {
			t.Fatalf("attempt %d refused without a hold", i+1)
		}
	}
}

func TestBurstHoldIsBounded(t *testing.T) {
	const max = 2 * time.Second
	f := newBurstFeed(max)
	for range burstTicks {
		f.tick(0.95, 30)
	}
	if f.b.current() == nil {
		t.Fatal("no hold")
	}
	// Deliveries pile up during the hold.
	f.b.queued.Add(1000)
	f.b.settled.Add(100)
	ticks := 0
	for f.tick(0.95, 30) {
		ticks++
		if ticks > 100 {
			t.Fatal("the hold outlasted its bound while the burst went on")
		}
	}
	if got := time.Duration(ticks+1) * burstTick; got < max-burstTick || got > max+burstTick {
		t.Fatalf("the hold lasted %s, want %s", got, max)
	}
	// The burst goes on, but what piled up is owed: deliveries run at
	// full concurrency until it is settled.
	for range 10 * burstTicks {
		if f.tick(0.95, 30) {
			t.Fatal("a second hold began before the first one's backlog was delivered")
		}
	}
	f.b.settled.Add(899)
	for range 10 * burstTicks {
		if f.tick(0.95, 30) {
			t.Fatal("a second hold began with one delivery of the first's backlog still owed")
		}
	}
	// Settled, with the CPU saturated all along: the next tick holds.
	f.b.settled.Add(1)
	if !f.tick(0.95, 30) {
		t.Fatal("no second hold once the first's backlog was delivered")
	}
}

func TestBurstHoldOwedBacklogExpires(t *testing.T) {
	f := newBurstFeed(time.Second)
	for f.b.current() == nil {
		f.tick(0.95, 30)
	}
	f.b.queued.Add(10) // never settled: another instance delivered them
	for f.tick(0.95, 30) {
	}
	held := false
	for range int(burstOwedFor/burstTick) + burstTicks + 1 {
		held = f.tick(0.95, 30)
		if held {
			break
		}
	}
	if !held {
		t.Fatalf("no hold %s after the last, with its backlog unsettled", burstOwedFor)
	}
}

func TestBurstHoldNeedsBothCPUAndQueue(t *testing.T) {
	f := newBurstFeed(DefaultBurstHold)
	for range 10 * burstTicks {
		// A drain: the CPU busy with deliveries, requests light.
		if f.tick(1, 0.5) {
			t.Fatal("held with requests not queueing")
		}
		// A slow disk: requests wait for the log, the CPU has room.
		if f.tick(0.4, 30) {
			t.Fatal("held with the CPU not saturated")
		}
	}
}

func TestBurstHoldOff(t *testing.T) {
	f := newBurstFeed(-1)
	for range 10 * burstTicks {
		if f.tick(1, 64) {
			t.Fatal("held with burst_hold off")
		}
	}
	f.b.setMax(DefaultBurstHold)
	for range burstTicks {
		f.tick(1, 64)
	}
	tg := burstTarget(1)
	ctx, cancel := context.WithCancel(context.Background())
	if !f.b.enter(ctx, tg) {
		t.Fatal("the one attempt of the share refused")
	}
	waiting := make(chan bool)
	go func() { waiting <- f.b.enter(ctx, tg) }()
	// Turning holds off (a reload, or the engine closing) ends the hold.
	f.b.setMax(0)
	if !<-waiting {
		t.Fatal("an attempt waiting for the hold was refused when holds were turned off")
	}
	f.b.leave(tg)
	f.b.setMax(DefaultBurstHold)
	for range burstTicks {
		f.tick(1, 64)
	}
	go func() { waiting <- f.b.enter(ctx, tg) }()
	cancel()
	if <-waiting {
		t.Fatal("an attempt waiting for the hold ran after its context ended")
	}
}

// TestBurstHoldHoldsTheWorkers: with a hold on, an engine's target of
// concurrency 16 has 2 requests out; once requests stop queueing the
// sampler ends the hold and all 16 go; every delivery is counted queued
// and settled.
func TestBurstHoldHoldsTheWorkers(t *testing.T) {
	target, release := newHangingTarget(t)
	tc := fastTarget("t", target.URL)
	tc.Concurrency = 16
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})

	// A hold, as the sampler starts one; requests seem to queue in
	// Receive (10 in flight on average) until the feed stops.
	e.burst.mu.Lock()
	e.burst.held, e.burst.since = make(chan struct{}), time.Now()
	e.burst.mu.Unlock()
	e.burstBegan()
	fed := make(chan struct{})
	go func() {
		defer close(fed)
		tick := time.NewTicker(burstTick / 10)
		defer tick.Stop()
		for range 4 * burstTicks * 10 { // 4 sampler ticks per burstTicks
			<-tick.C
			e.burst.inReceive.Add(int64(10 * burstTick / 10))
		}
	}()
	for i := range 20 {
		mustAccept(t, e, v3Body(fmt.Sprintf("burst-%d", i)))
	}
	<-fed
	if e.burst.current() == nil {
		t.Fatal("the hold ended while requests queued")
	}
	if got := target.maxIn.Load(); got != 2 {
		t.Fatalf("%d requests out at once during the hold, want 2 (16/8)", got)
	}
	waitFor(t, "the hold to end once requests stop queueing", 5*time.Second, func() bool { return e.burst.current() == nil })
	waitFor(t, "all 16 workers out", 5*time.Second, func() bool { return target.inflight.Load() == 16 })
	release()
	waitFor(t, "the deliveries", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	waitFor(t, "the settles counted", 5*time.Second, func() bool { return e.burst.settled.Load() == 20 })
	if q := e.burst.queued.Load(); q != 20 {
		t.Fatalf("%d deliveries counted queued, want 20", q)
	}
}
