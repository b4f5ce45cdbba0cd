package relay

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// Version is sent in the User-Agent of forwarded requests.
const Version = "0.1.0"

// Options are an engine's collaborators.
type Options struct {
	// OpenStore opens the store; Open calls it once.
	OpenStore func() (store.Store, error)
	// Logger; nil logs nothing.
	Logger *zap.Logger
	// Metrics; nil makes private ones (for tests and embedding).
	Metrics *Metrics
	// Now is the clock; nil is time.Now.
	Now func() time.Time
}

type engineState uint8

const (
	stateNew engineState = iota
	stateOpen
	stateClosed
)

// Engine receives, stores and delivers the events of one relay.
type Engine struct {
	opts Options
	now  func() time.Time
	log  *zap.Logger
	m    *Metrics

	// mu orders config changes against Receive: Receive holds it shared
	// from reading the config until its deliveries are queued.
	mu      sync.RWMutex
	cfg     *Config
	state   engineState
	st      store.Store
	targets map[string]*target
	counts  map[string]*counts // every target with state, removed ones too
	dd      *dedupe
	ctrs    atomic.Pointer[engineCounters] // swapped when the relay is renamed

	pendingEvents atomic.Int64
	loaded        chan struct{} // closed once Open's backlog is queued

	settleErrors atomic.Int64
	settleLogged atomic.Int64 // unix ns of the last such log line

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// counts are a target's gauges.
type counts struct {
	pending, dead atomic.Int64
}

// engineCounters are the metric children of one relay name, resolved once.
type engineCounters struct {
	name      string
	received  map[string]prometheus.Counter
	ack       prometheus.Observer
	evictions prometheus.Counter
}

// New checks cfg and returns an engine that does nothing until Open.
func New(cfg Config, opts Options) (*Engine, error) {
	c, err := cfg.WithDefaults()
	if err != nil {
		return nil, err
	}
	if opts.OpenStore == nil {
		return nil, errors.New("relay: no store")
	}
	e := &Engine{
		opts:    opts,
		now:     opts.Now,
		log:     opts.Logger,
		m:       opts.Metrics,
		cfg:     &c,
		targets: map[string]*target{},
		counts:  map[string]*counts{},
		loaded:  make(chan struct{}),
	}
	if e.now == nil {
		e.now = time.Now
	}
	if e.log == nil {
		e.log = zap.NewNop()
	}
	if e.m == nil {
		e.m = NewMetrics()
	}
	e.ctrs.Store(e.newCounters(c.Name))
	e.dd = newDedupe(c.Dedupe.Capacity, func() { e.ctrs.Load().evictions.Inc() })
	return e, nil
}

func (e *Engine) newCounters(name string) *engineCounters {
	ec := &engineCounters{
		name:      name,
		received:  map[string]prometheus.Counter{},
		ack:       e.m.AckDuration.WithLabelValues(name),
		evictions: e.m.DedupeEvictions.WithLabelValues(name),
	}
	for _, r := range []string{ResultAccepted, ResultDuplicate, ResultUnauthorized, ResultInvalid, ResultTooLarge, ResultUnavailable} {
		ec.received[r] = e.m.Received.WithLabelValues(name, r)
	}
	return ec
}

// Name returns the relay's name.
func (e *Engine) Name() string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.cfg.Name
}

// Config returns the settings in force.
func (e *Engine) Config() Config {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return *e.cfg
}

// Open opens the store and starts the workers; from then on the engine
// takes events. The deliveries pending in the store are queued in the
// background (see load), so that a restart with a large backlog serves at
// once. Deliveries pending at a target the config no longer has become
// dead letters first. Calling Open on an open engine does nothing.
func (e *Engine) Open() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch e.state {
	case stateOpen:
		return nil
	case stateClosed:
		return fmt.Errorf("opening relay %s: %w", e.cfg.Name, store.ErrClosed)
	}
	st, err := e.opts.OpenStore()
	if err != nil {
		return fmt.Errorf("opening relay %s: %w", e.cfg.Name, err)
	}
	bl, err := e.killRemoved(st)
	if err != nil {
		st.Close()
		return fmt.Errorf("opening relay %s: %w", e.cfg.Name, err)
	}
	e.st = st
	pending := bl.PendingEvents()
	e.pendingEvents.Store(int64(pending))
	e.ctx, e.cancel = context.WithCancel(context.Background())
	loading := map[string]*target{}
	for i := range e.cfg.Targets {
		tc := e.cfg.Targets[i]
		t := e.newTarget(tc)
		e.targets[tc.Name] = t
		loading[tc.Name] = t
		e.startWorkers(t)
	}
	// The gauges of targets with dead letters, removed ones too, exist
	// before the load, so that a change made meanwhile has one to move.
	dead := map[string]*counts{}
	for _, name := range bl.DeadTargets() {
		dead[name] = e.countsOf(name)
	}
	e.wg.Add(2)
	go e.load(bl, loading, dead)
	go e.janitor()
	e.state = stateOpen
	e.m.add(e)
	e.log.Info("relay open",
		zap.String("relay", e.cfg.Name),
		zap.Int("pending_events", pending))
	return nil
}

// killRemoved dead-letters the deliveries pending at targets the config no
// longer has, and returns the store's backlog taken after that.
func (e *Engine) killRemoved(st store.Store) (store.Backlog, error) {
	bl, err := st.Backlog()
	if err != nil {
		return nil, fmt.Errorf("reading store: %w", err)
	}
	configured := map[string]bool{}
	for _, t := range e.cfg.Targets {
		configured[t.Name] = true
	}
	var removed []string
	for _, name := range bl.Targets() {
		if !configured[name] {
			removed = append(removed, name)
		}
	}
	if len(removed) == 0 {
		return bl, nil
	}
	bl.Close()
	for _, name := range removed {
		moved, _, err := st.KillTarget(name, ReasonTargetRemoved, e.now())
		if err != nil {
			return nil, fmt.Errorf("dead-lettering deliveries of removed target %s: %w", name, err)
		}
		e.log.Warn("target removed from config: its pending deliveries are now dead letters",
			zap.String("target", name), zap.Int("count", moved))
	}
	bl, err = st.Backlog()
	if err != nil {
		return nil, fmt.Errorf("reading store: %w", err)
	}
	return bl, nil
}

// loadBatch is how many deliveries load queues at a time.
const loadBatch = 4096

// load queues the backlog taken when the engine opened, while the engine
// already takes and delivers new events. The backlog holds exactly what was
// stored before Open returned, so no delivery is queued twice; it adds its
// counts to the gauges (dead letters first, pending ones as they are
// queued), which every write since has moved by its own change. It never
// takes the engine's lock while it holds the backlog: bbolt cannot grow its
// mapping while a snapshot is open, and an Update holding the lock may be
// waiting for a write.
func (e *Engine) load(bl store.Backlog, targets map[string]*target, deadCounts map[string]*counts) {
	defer e.wg.Done()
	defer close(e.loaded)
	start := time.Now()
	n := 0
	batch := map[*target][]item{}
	flush := func() {
		for t, items := range batch {
			t.counts.pending.Add(int64(len(items)))
			select {
			case <-t.quit: // removed meanwhile: its deliveries are dead letters now
			default:
				t.q.pushAll(items)
			}
			batch[t] = items[:0]
		}
	}
	dead, err := bl.Dead()
	for name, k := range dead {
		if c := deadCounts[name]; c != nil {
			c.dead.Add(int64(k))
		}
	}
	if err == nil {
		err = bl.Pending(func(d *store.Delivery) error {
			if err := e.ctx.Err(); err != nil {
				return err
			}
			t := targets[d.Target]
			if t == nil { // cannot be: removed targets were settled before
				return nil
			}
			batch[t] = append(batch[t], itemOf(d))
			if n++; n%loadBatch == 0 {
				flush()
			}
			return nil
		})
	}
	flush()
	bl.Close()
	if errors.Is(err, context.Canceled) {
		return
	}
	if err != nil {
		e.log.Error("loading pending deliveries: some stay undelivered until the next start",
			zap.String("relay", e.Name()), zap.Error(err))
		return
	}
	if n > 0 {
		e.log.Info("pending deliveries queued",
			zap.String("relay", e.Name()), zap.Int("count", n), zap.Duration("took", time.Since(start)))
	}
}

func (e *Engine) countsOf(name string) *counts {
	c := e.counts[name]
	if c == nil {
		c = &counts{}
		e.counts[name] = c
	}
	return c
}

// Close stops the workers (an attempt under way is abandoned and stays
// pending), then closes the store. Calling it again does nothing.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.state != stateOpen {
		e.state = stateClosed
		e.mu.Unlock()
		return nil
	}
	e.state = stateClosed
	e.cancel()
	targets := e.targets
	e.mu.Unlock()
	e.wg.Wait()
	for _, t := range targets {
		t.q.stop()
		t.conns.CloseIdleConnections()
	}
	e.m.remove(e)
	err := e.st.Close()
	e.log.Info("relay closed", zap.String("relay", e.Name()))
	return err
}

// Update applies new settings to the live engine: dedupe capacity,
// limits, and targets (added ones start, changed ones take their new
// settings from their next attempt on, removed ones stop and what they
// still owed becomes dead letters).
func (e *Engine) Update(cfg Config) error {
	c, err := cfg.WithDefaults()
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	old := e.cfg
	e.cfg = &c
	if c.Name != e.ctrs.Load().name {
		e.ctrs.Store(e.newCounters(c.Name))
		for _, t := range e.targets {
			t.metrics.Store(e.targetMetrics(c.Name, t.name))
		}
	}
	e.dd.resize(c.Dedupe.Capacity, e.now())
	if e.state != stateOpen {
		return nil
	}
	keep := map[string]bool{}
	for i := range c.Targets {
		tc := c.Targets[i]
		keep[tc.Name] = true
		if t := e.targets[tc.Name]; t != nil {
			if !reflect.DeepEqual(*t.cfg.Swap(&tc), tc) && t.q.release() {
				// A new URL, timeout or header may be the fix.
				e.log.Info("target changed: its held deliveries resume", zap.String("target", tc.Name))
			}
			e.startWorkers(t)
			t.q.wake()
			continue
		}
		t := e.newTarget(tc)
		e.targets[tc.Name] = t
		e.startWorkers(t)
	}
	for _, tc := range old.Targets {
		if keep[tc.Name] {
			continue
		}
		t := e.targets[tc.Name]
		delete(e.targets, tc.Name)
		if t == nil {
			continue
		}
		close(t.quit)
		t.q.stop()
		// Close skips removed targets: free their idle connections now.
		t.conns.CloseIdleConnections()
		moved, settled, err := e.st.KillTarget(tc.Name, ReasonTargetRemoved, e.now())
		if err != nil {
			e.log.Error("dead-lettering deliveries of removed target", zap.String("target", tc.Name), zap.Error(err))
			continue
		}
		t.counts.pending.Add(-int64(moved))
		t.counts.dead.Add(int64(moved))
		t.metrics.Load().dead.Add(float64(moved))
		e.pendingEvents.Add(-int64(settled))
		if moved > 0 {
			e.log.Warn("target removed from config: its pending deliveries are now dead letters",
				zap.String("target", tc.Name), zap.Int("count", moved))
		}
	}
	return nil
}

// Result is the answer to one received event.
type Result struct {
	EventID   store.ID
	Duplicate bool
}

// Receive dedupes and durably stores one event; when it returns without
// error the event may be acked. Errors are ErrUnavailable or ErrFull
// (answer 503: the sender keeps the event and retries).
func (e *Engine) Receive(body []byte, contentType string) (Result, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.state != stateOpen {
		return Result{}, ErrUnavailable
	}
	cfg := e.cfg
	now := e.now()
	id := cfg.EventID(body)
	res := Result{EventID: id}
	dedupe := !cfg.Dedupe.Off
	if dedupe && e.dd.seen(id, now) {
		res.Duplicate = true
		return res, nil
	}
	var targets []*target
	for i := range cfg.Targets {
		if cfg.Targets[i].Matches(body) {
			targets = append(targets, e.targets[cfg.Targets[i].Name])
		}
	}
	if len(targets) > 0 {
		if e.pendingEvents.Add(1) > int64(cfg.MaxPending) {
			e.pendingEvents.Add(-1)
			if dedupe {
				if seen, err := e.st.Seen(id, now); err == nil && seen {
					res.Duplicate = true
					return res, nil
				}
			}
			return res, ErrFull
		}
	}
	var expiry time.Time
	if dedupe {
		expiry = now.Add(cfg.Dedupe.TTL)
	}
	names := make([]string, len(targets))
	for i, t := range targets {
		names[i] = t.name
	}
	dup, err := e.st.Accept(&store.Event{ID: id, ReceivedAt: now, ContentType: contentType, Body: body}, names, expiry, now)
	if err != nil || dup {
		if len(targets) > 0 {
			e.pendingEvents.Add(-1)
		}
	}
	if err != nil {
		return res, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if dedupe {
		// Only now that it is stored does the key count as seen.
		e.dd.add(id, expiry, now)
	}
	if dup {
		res.Duplicate = true
		return res, nil
	}
	for _, t := range targets {
		t.counts.pending.Add(1)
		t.q.push(item{due: now.UnixNano(), recv: now.UnixNano(), id: id})
	}
	return res, nil
}

// Observe counts one answered request by result and, for 200 and 503
// answers, the time from the request's start to the answer.
func (e *Engine) Observe(result string, d time.Duration) {
	c := e.ctrs.Load()
	if r := c.received[result]; r != nil {
		r.Inc()
	}
	switch result {
	case ResultAccepted, ResultDuplicate, ResultUnavailable:
		// Answers to an event the sender may send again; rejections of
		// bad requests are not acks.
		c.ack.Observe(d.Seconds())
	}
}

// RetryAfter is what a 503 should tell the sender.
func (e *Engine) RetryAfter() time.Duration {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.cfg.RetryAfter
}

// TargetStats are one target's counts.
type TargetStats struct {
	Name        string `json:"name"`
	Configured  bool   `json:"configured"`
	Pending     int64  `json:"pending"`
	DeadLetters int64  `json:"dead_letters"`
	// Held: the target failed too often in a row; its deliveries wait
	// while one probe at a time finds out whether it is back.
	Held bool `json:"held"`
}

// Stats returns the counts of every target with state, sorted by name.
func (e *Engine) Stats() []TargetStats {
	e.mu.RLock()
	defer e.mu.RUnlock()
	out := make([]TargetStats, 0, len(e.counts))
	for name, c := range e.counts {
		t, ok := e.targets[name]
		if !ok && c.pending.Load() == 0 && c.dead.Load() == 0 {
			continue
		}
		out = append(out, TargetStats{Name: name, Configured: ok, Pending: c.pending.Load(), DeadLetters: c.dead.Load(), Held: ok && t.q.isHeld()})
	}
	for _, t := range e.cfg.Targets {
		if _, ok := e.counts[t.Name]; !ok {
			out = append(out, TargetStats{Name: t.Name, Configured: true})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Loaded is closed once the deliveries pending when the engine opened are
// queued and counted in Stats (or the engine closed first).
func (e *Engine) Loaded() <-chan struct{} { return e.loaded }

// IsOpen reports whether the engine is open (and not yet closed).
func (e *Engine) IsOpen() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.state == stateOpen
}

// IsNew reports whether the engine was never opened.
func (e *Engine) IsNew() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.state == stateNew
}

// PendingEvents returns how many events are still owed to a target.
func (e *Engine) PendingEvents() int64 { return e.pendingEvents.Load() }

func (e *Engine) openStore() (store.Store, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.state != stateOpen {
		return nil, ErrUnavailable
	}
	return e.st, nil
}

// DeadLetters lists dead letters (see store.Store.DeadLetters).
func (e *Engine) DeadLetters(target, cursor string, limit int) ([]store.DeadLetter, string, error) {
	st, err := e.openStore()
	if err != nil {
		return nil, "", err
	}
	return st.DeadLetters(target, cursor, limit)
}

// Replay moves dead letters back to pending with a fresh attempt budget,
// for targets the config still has, and returns how many moved.
func (e *Engine) Replay(ids []store.ID, target string) (int, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.state != stateOpen {
		return 0, ErrUnavailable
	}
	keep := func(t string) bool { return e.targets[t] != nil }
	moved, revived, err := e.st.Replay(ids, target, keep, e.now())
	if err != nil {
		return 0, err
	}
	e.pendingEvents.Add(int64(revived))
	for _, d := range moved {
		t := e.targets[d.Target]
		t.counts.dead.Add(-1)
		t.counts.pending.Add(1)
		t.q.push(itemOf(&d))
	}
	return len(moved), nil
}

// DeleteDead deletes the dead letters of one event, at one target or all
// (target ""), and returns how many it deleted.
func (e *Engine) DeleteDead(id store.ID, target string) (int, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.state != stateOpen {
		return 0, ErrUnavailable
	}
	n, err := e.st.DeleteDead(id, target)
	if err != nil {
		return 0, err
	}
	total := 0
	for t, k := range n {
		if c := e.counts[t]; c != nil {
			c.dead.Add(-int64(k))
		}
		total += k
	}
	return total, nil
}

// logEvery reports whether at least every has passed since *last, and if
// so moves *last to now: a rate limit for repeated error logs.
func (e *Engine) logEvery(last *atomic.Int64, every time.Duration) bool {
	now := time.Now().UnixNano()
	prev := last.Load()
	return now-prev >= int64(every) && last.CompareAndSwap(prev, now)
}

// janitor forgets expired dedupe keys.
func (e *Engine) janitor() {
	defer e.wg.Done()
	// Every tenth of the TTL, at most a minute, at least a second; read
	// afresh each time, since a reload may change the TTL.
	interval := func() time.Duration {
		return min(max(e.Config().Dedupe.TTL/10, time.Second), time.Minute)
	}
	tick := time.NewTimer(interval())
	defer tick.Stop()
	for {
		select {
		case <-e.ctx.Done():
			return
		case <-tick.C:
			tick.Reset(interval())
			n, err := e.st.ExpireKeys(e.now())
			if err != nil && !errors.Is(err, store.ErrClosed) {
				e.log.Error("expiring dedupe keys", zap.Error(err))
			} else if n > 0 {
				e.log.Debug("expired dedupe keys", zap.Int("count", n))
			}
		}
	}
}

// ExpireKeys forgets expired dedupe keys now (the janitor does it
// periodically) and returns how many.
func (e *Engine) ExpireKeys() (int, error) {
	st, err := e.openStore()
	if err != nil {
		return 0, err
	}
	return st.ExpireKeys(e.now())
}

// collect sends the engine's gauges.
func (e *Engine) collect(ch chan<- prometheus.Metric) {
	e.mu.RLock()
	name := e.cfg.Name
	st := e.st
	open := e.state == stateOpen
	type tc struct {
		name string
		c    *counts
		held bool
	}
	var all []tc
	for n, c := range e.counts {
		t := e.targets[n]
		all = append(all, tc{n, c, t != nil && t.q.isHeld()})
	}
	e.mu.RUnlock()
	if !open {
		return
	}
	now := e.now()
	ch <- prometheus.MustNewConstMetric(descDedupe, prometheus.GaugeValue, float64(e.dd.len()), name)
	for _, t := range all {
		ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(t.c.pending.Load()), name, t.name)
		ch <- prometheus.MustNewConstMetric(descDead, prometheus.GaugeValue, float64(t.c.dead.Load()), name, t.name)
		age := 0.0
		if at, ok, err := st.OldestPending(t.name); err == nil && ok {
			age = max(now.Sub(at).Seconds(), 0)
		}
		ch <- prometheus.MustNewConstMetric(descOldest, prometheus.GaugeValue, age, name, t.name)
		held := 0.0
		if t.held {
			held = 1
		}
		ch <- prometheus.MustNewConstMetric(descHeld, prometheus.GaugeValue, held, name, t.name)
	}
}
