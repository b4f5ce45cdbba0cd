package relay

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
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
	// Now is the clock; nil is time.Now. Give the store the same one.
	Now func() time.Time
}

type engineState uint8

const (
	stateNew engineState = iota
	stateOpen
	stateClosed
)

// adminTimeout bounds a store call made for the admin API or the gauges
// when the caller gave no deadline of its own.
const adminTimeout = 10 * time.Second

// Engine receives, stores and delivers the events of one relay. It owns
// no delivery state of its own: the store keeps the queues, the attempts
// and the counts; the engine keeps the settings, the workers, the
// breakers and the in-memory dedupe cache.
type Engine struct {
	opts Options
	now  func() time.Time
	log  *zap.Logger
	m    *Metrics

	// mu orders config changes against Receive: Receive holds it shared
	// while it writes, so that no event is stored for a target that an
	// Update is retiring.
	mu      sync.RWMutex
	cfg     *Config
	state   engineState
	st      store.Store
	targets map[string]*target
	dd      *dedupe
	burst   burstHold
	ctrs    atomic.Pointer[engineCounters] // swapped when the relay is renamed
	hist    *history                       // kept across renames and reloads
	loaded  chan struct{}                  // closed once the store's backlog is queued

	// built are the targets' settings compiled by New, for Open.
	built map[string]*settings
	// shared: the store is shared by several instances (store.Sharer).
	shared bool
	// keyTTL is the dedupe ttl in ns, for what expires with it.
	keyTTLns atomic.Int64

	settleErrors  atomic.Int64
	settleLogged  atomic.Int64 // unix ns of the last such log line
	takeLogged    atomic.Int64
	breakerLogged atomic.Int64
	rateLogged    atomic.Int64
	staleLogged   atomic.Int64
	pauseLogged   atomic.Int64
	outcomeLogged atomic.Int64

	// pauseMu orders the writes of pause records against syncPauses'
	// reads; pausePoke asks syncPauses to read them now.
	pauseMu   sync.Mutex
	pausePoke chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// engineCounters are the metric children of one relay name, resolved once.
type engineCounters struct {
	name      string
	received  map[string]counter
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
		opts:      opts,
		now:       opts.Now,
		log:       opts.Logger,
		m:         opts.Metrics,
		cfg:       &c,
		targets:   map[string]*target{},
		loaded:    make(chan struct{}),
		pausePoke: make(chan struct{}, 1),
		hist:      newHistory(),
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
	if e.built, err = buildAll(&c, nil); err != nil {
		return nil, err
	}
	e.keyTTLns.Store(int64(c.Dedupe.TTL))
	e.ctrs.Store(e.newCounters(c.Name))
	e.dd = newDedupe(c.Dedupe.Capacity, func() { e.ctrs.Load().evictions.Inc() })
	return e, nil
}

func (e *Engine) newCounters(name string) *engineCounters {
	ec := &engineCounters{
		name:      name,
		received:  map[string]counter{},
		ack:       e.m.AckDuration.WithLabelValues(name),
		evictions: e.m.DedupeEvictions.WithLabelValues(name),
	}
	for _, r := range []string{ResultAccepted, ResultDuplicate, ResultUnauthorized, ResultInvalid, ResultTooLarge, ResultUnavailable} {
		ec.received[r] = counter{e.m.Received.WithLabelValues(name, r), e.hist.intakeRing(r)}
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
// takes events. A store that loads its backlog in the background
// (store.Loader) serves at once; once it has loaded, the deliveries still
// pending at targets the config no longer has are retired. Calling Open
// on an open engine does nothing.
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
	e.st = st
	if sh, ok := st.(store.Sharer); ok && sh.Shared() {
		e.shared = true
	}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	for i := range e.cfg.Targets {
		t, err := e.newTarget(e.built[e.cfg.Targets[i].Name])
		if err != nil {
			e.cancel()
			st.Close()
			e.st = nil
			e.targets = map[string]*target{}
			return fmt.Errorf("opening relay %s: %w", e.cfg.Name, err)
		}
		e.targets[t.name] = t
	}
	for _, t := range e.targets {
		e.startWorkers(t)
	}
	e.burst.setMax(e.cfg.BurstHold)
	e.wg.Add(6)
	go e.watchBursts()
	go e.retireRemoved()
	go e.janitor()
	go e.syncBreakers()
	go e.syncPauses()
	go e.samplePending()
	e.state = stateOpen
	e.m.add(e)
	e.log.Info("relay open", zap.String("relay", e.cfg.Name))
	return nil
}

// retireRemoved waits for the store's backlog, then retires the targets
// with deliveries that the config does not have.
func (e *Engine) retireRemoved() {
	defer e.wg.Done()
	defer close(e.loaded)
	if l, ok := e.st.(store.Loader); ok {
		select {
		case <-l.Loaded():
		case <-e.ctx.Done():
			return
		}
	}
	ctx, cancel := context.WithTimeout(e.ctx, adminTimeout)
	defer cancel()
	counts, err := e.st.Counts(ctx)
	if err != nil {
		if e.ctx.Err() == nil {
			e.log.Warn("could not count the store's deliveries: targets removed from the config keep theirs until the next start",
				zap.String("relay", e.Name()), zap.Error(err))
		}
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.state != stateOpen {
		return
	}
	for _, name := range slices.Sorted(maps.Keys(counts.Targets)) {
		if e.targets[name] == nil && counts.Targets[name].Pending > 0 {
			e.retire(name)
		}
	}
}

// retire tells the store that the config no longer has target; a store of
// one instance makes its pending deliveries dead letters. e.mu is held.
func (e *Engine) retire(name string) {
	ctx, cancel := context.WithTimeout(e.ctx, adminTimeout)
	defer cancel()
	moved, err := e.st.Retire(ctx, name, ReasonTargetRemoved)
	if err != nil {
		e.log.Error("retiring a target removed from config", zap.String("target", name), zap.Error(err))
		return
	}
	if moved > 0 {
		e.log.Warn("target removed from config: its pending deliveries are now dead letters",
			zap.String("target", name), zap.Int("count", moved))
	}
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
		t.stop()
	}
	e.m.remove(e)
	err := e.st.Close()
	e.log.Info("relay closed", zap.String("relay", e.Name()))
	return err
}

// Update applies new settings to the live engine: dedupe capacity,
// limits, and targets (added ones start, changed ones take their new
// settings from their next attempt on, removed ones stop and are retired
// in the store).
func (e *Engine) Update(cfg Config) error {
	c, err := cfg.WithDefaults()
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	// Build every changed target's settings before changing anything: a
	// transform that does not compile leaves the engine as it was.
	current := map[string]*settings{}
	if e.state == stateOpen {
		for name, t := range e.targets {
			current[name] = t.cfg.Load()
		}
	} else {
		current = e.built
	}
	built, err := buildAll(&c, current)
	if err != nil {
		return err
	}
	old := e.cfg
	e.cfg = &c
	e.built = built
	e.keyTTLns.Store(int64(c.Dedupe.TTL))
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
	e.burst.setMax(c.BurstHold)
	keep := map[string]bool{}
	var errs []error
	for i := range c.Targets {
		tc := c.Targets[i]
		keep[tc.Name] = true
		if t := e.targets[tc.Name]; t != nil {
			if prev := t.cfg.Swap(built[tc.Name]); prev != built[tc.Name] {
				if prev.conns != built[tc.Name].conns {
					// New TLS settings: the old connections go once idle.
					prev.conns.CloseIdleConnections()
				}
				t.pace.set(tc.Rate)
				if _, err := e.st.Queue(tc.Name, leaseFor(&tc)); err != nil {
					errs = append(errs, fmt.Errorf("target %s: %w", tc.Name, err))
				}
				if t.brk.release() {
					// A new URL, timeout or header may be the fix.
					e.log.Info("target changed: its held deliveries resume", zap.String("target", tc.Name))
				}
			}
			e.startWorkers(t)
			t.lookAgain(e.ctx)
			continue
		}
		t, err := e.newTarget(built[tc.Name])
		if err != nil {
			errs = append(errs, fmt.Errorf("target %s: %w", tc.Name, err))
			continue
		}
		e.targets[tc.Name] = t
		e.startWorkers(t)
		e.pokePauses() // its gate stays shut until its pause record is read
	}
	for _, tc := range old.Targets {
		if keep[tc.Name] {
			continue
		}
		if t := e.targets[tc.Name]; t != nil {
			delete(e.targets, tc.Name)
			close(t.quit)
			t.stop()
		}
		e.retire(tc.Name)
	}
	return errors.Join(errs...)
}

// buildAll returns the settings of c's targets: current's where a target
// is unchanged (its pipeline, client and connections kept), built afresh
// where it is new or changed. Change is a comparison of settings, which
// hold the contents of the files they name, never of compiled programs.
func buildAll(c *Config, current map[string]*settings) (map[string]*settings, error) {
	out := make(map[string]*settings, len(c.Targets))
	for _, tc := range c.Targets {
		old := current[tc.Name]
		if old != nil && reflect.DeepEqual(old.TargetConfig, tc) {
			out[tc.Name] = old
			continue
		}
		s, err := build(c, tc, old)
		if err != nil {
			return nil, err
		}
		out[tc.Name] = s
	}
	return out, nil
}

// keyTTL is how long a dedupe key counts as seen, and what expires with it.
func (e *Engine) keyTTL() time.Duration { return time.Duration(e.keyTTLns.Load()) }

// Result is the answer to one received event.
type Result struct {
	EventID   store.ID
	Duplicate bool
}

// Receive dedupes and durably stores one event; when it returns without
// error the event may be acked. Errors are ErrUnavailable or ErrFull
// (answer 503: the sender keeps the event and retries), or ErrTooLarge
// (answer 413: the store can never hold it). ctx bounds the wait for a
// shared store.
func (e *Engine) Receive(ctx context.Context, body []byte, contentType string) (Result, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.state != stateOpen {
		return Result{}, ErrUnavailable
	}
	start := time.Now()
	defer func() { e.burst.inReceive.Add(int64(time.Since(start))) }()
	cfg := e.cfg
	now := e.now()
	id := cfg.EventID(body)
	res := Result{EventID: id}
	dedupe := !cfg.Dedupe.Off
	if dedupe && e.dd.seen(id, now) {
		res.Duplicate = true
		return res, nil
	}
	var names, orderKeys []string
	for i := range cfg.Targets {
		tc := &cfg.Targets[i]
		if !tc.Matches(body) {
			continue
		}
		names = append(names, tc.Name)
		if tc.OrderBy != "" {
			if orderKeys == nil {
				orderKeys = make([]string, len(names)-1, len(cfg.Targets))
			}
			orderKeys = append(orderKeys, orderKey(body, tc.OrderBy))
		} else if orderKeys != nil {
			orderKeys = append(orderKeys, "")
		}
	}
	opts := store.AcceptOptions{MaxPending: cfg.MaxPending, OrderKeys: orderKeys}
	if dedupe {
		opts.KeyExpiry = now.Add(cfg.Dedupe.TTL)
	}
	ev := &store.Event{ID: id, ReceivedAt: now, ContentType: contentType, Body: body}
	dup, err := e.st.Accept(ctx, ev, names, opts)
	if errors.Is(err, store.ErrFull) {
		if dedupe {
			if seen, err := e.st.Seen(ctx, id, now); err == nil && seen {
				res.Duplicate = true
				return res, nil
			}
		}
		return res, ErrFull
	}
	if errors.Is(err, store.ErrTooLarge) {
		return res, fmt.Errorf("%w: %v", ErrTooLarge, err)
	}
	if err != nil {
		return res, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if dedupe {
		// Only now that it is stored does the key count as seen.
		e.dd.add(id, opts.KeyExpiry, now)
	}
	if !dup {
		e.burst.queued.Add(int64(len(names)))
	}
	res.Duplicate = dup
	return res, nil
}

// Observe counts one answered request by result and, for 200 and 503
// answers, the time from the request's start to the answer.
func (e *Engine) Observe(result string, d time.Duration) {
	c := e.ctrs.Load()
	if r, ok := c.received[result]; ok {
		r.inc(e.now())
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
	// OldestPendingSeconds is the age of the oldest event still waiting
	// for the target.
	OldestPendingSeconds float64 `json:"oldest_pending_seconds"`
	// Held: the target failed too often in a row; its deliveries wait
	// while one probe at a time finds out whether it is back.
	Held bool `json:"held"`
	// Paused: an operator paused the target (Engine.Pause); its
	// deliveries wait until it is resumed.
	Paused bool `json:"paused"`
}

// Overview is the relay's state as the admin API shows it.
type Overview struct {
	PendingEvents int64         `json:"pending_events"`
	StoreUp       bool          `json:"store_up"`
	StoreError    string        `json:"store_error,omitempty"`
	Targets       []TargetStats `json:"targets"`
}

// Overview returns the counts of every target with state, sorted by name,
// and whether the store takes writes.
func (e *Engine) Overview(ctx context.Context) Overview {
	var ov Overview
	up, err := e.StoreUp()
	ov.StoreUp = up
	if err != nil {
		ov.StoreError = err.Error()
	}
	counts, err := e.counts(ctx)
	switch {
	case err == nil:
		e.recordPendingFrom(counts)
	case ov.StoreError == "":
		ov.StoreError = err.Error()
	}
	ov.PendingEvents = int64(counts.PendingEvents)
	ov.Targets = e.targetStats(counts)
	return ov
}

func (e *Engine) targetStats(counts store.Counts) []TargetStats {
	now := e.now()
	e.mu.RLock()
	defer e.mu.RUnlock()
	out := make([]TargetStats, 0, len(counts.Targets)+len(e.cfg.Targets))
	for name, c := range counts.Targets {
		t, ok := e.targets[name]
		if !ok && c.Pending == 0 && c.Dead == 0 {
			continue
		}
		ts := TargetStats{
			Name: name, Configured: ok, Pending: int64(c.Pending), DeadLetters: int64(c.Dead),
			Held: ok && t.brk.isHeld(), Paused: ok && t.pause.isPaused(),
		}
		if !c.OldestPending.IsZero() {
			ts.OldestPendingSeconds = max(now.Sub(c.OldestPending).Seconds(), 0)
		}
		out = append(out, ts)
	}
	for _, tc := range e.cfg.Targets {
		if _, ok := counts.Targets[tc.Name]; !ok {
			t := e.targets[tc.Name]
			out = append(out, TargetStats{
				Name: tc.Name, Configured: true,
				Held: t != nil && t.brk.isHeld(), Paused: t != nil && t.pause.isPaused(),
			})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// counts asks the store for its counts, bounded by adminTimeout.
func (e *Engine) counts(ctx context.Context) (store.Counts, error) {
	st, err := e.openStore()
	if err != nil {
		return store.Counts{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, adminTimeout)
	defer cancel()
	return st.Counts(ctx)
}

// StoreUp reports whether the store takes writes now, and why not.
func (e *Engine) StoreUp() (bool, error) {
	st, err := e.openStore()
	if err != nil {
		return false, err
	}
	if h, ok := st.(store.Health); ok {
		return h.Up()
	}
	return true, nil
}

// Loaded is closed once the deliveries pending when the engine opened are
// queued and counted, and those of removed targets retired (or the engine
// closed first).
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
func (e *Engine) PendingEvents() int64 {
	c, _ := e.counts(context.Background())
	return int64(c.PendingEvents)
}

func (e *Engine) openStore() (store.Store, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.state != stateOpen {
		return nil, ErrUnavailable
	}
	return e.st, nil
}

// DeadLetters lists dead letters (see store.DeadLetters).
func (e *Engine) DeadLetters(ctx context.Context, target, cursor string, limit int) ([]store.DeadLetter, string, error) {
	st, err := e.openStore()
	if err != nil {
		return nil, "", err
	}
	return st.DeadLetters(ctx, target, cursor, limit)
}

// Replay moves dead letters back to pending with a fresh attempt budget,
// for targets the config still has, and returns how many moved.
func (e *Engine) Replay(ctx context.Context, ids []store.ID, target string) (int, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.state != stateOpen {
		return 0, ErrUnavailable
	}
	keep := func(t string) bool { return e.targets[t] != nil }
	return e.st.Replay(ctx, ids, target, keep)
}

// DeleteDead deletes the dead letters of one event, at one target or all
// (target ""), and returns how many it deleted.
func (e *Engine) DeleteDead(ctx context.Context, id store.ID, target string) (int, error) {
	st, err := e.openStore()
	if err != nil {
		return 0, err
	}
	return st.DeleteDead(ctx, id, target)
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
			n, err := e.st.ExpireKeys(e.ctx, e.now())
			if err != nil && !errors.Is(err, store.ErrClosed) && e.ctx.Err() == nil {
				e.log.Error("expiring dedupe keys", zap.Error(err))
			} else if n > 0 {
				e.log.Debug("expired dedupe keys", zap.Int("count", n))
			}
		}
	}
}

// ExpireKeys forgets expired dedupe keys now (the janitor does it
// periodically) and returns how many.
func (e *Engine) ExpireKeys(ctx context.Context) (int, error) {
	st, err := e.openStore()
	if err != nil {
		return 0, err
	}
	return st.ExpireKeys(ctx, e.now())
}

// collect sends the engine's gauges.
func (e *Engine) collect(ch chan<- prometheus.Metric) {
	e.mu.RLock()
	name := e.cfg.Name
	open := e.state == stateOpen
	e.mu.RUnlock()
	if !open {
		return
	}
	up := 0.0
	if ok, _ := e.StoreUp(); ok {
		up = 1
	}
	ch <- prometheus.MustNewConstMetric(descStoreUp, prometheus.GaugeValue, up, name)
	ch <- prometheus.MustNewConstMetric(descDedupe, prometheus.GaugeValue, float64(e.dd.len()), name)
	burst := 0.0
	if e.burst.current() != nil {
		burst = 1
	}
	ch <- prometheus.MustNewConstMetric(descBurst, prometheus.GaugeValue, burst, name)
	counts, err := e.counts(context.Background())
	if err != nil {
		return // the store is down: no gauge is better than a wrong one
	}
	for _, t := range e.targetStats(counts) {
		ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(t.Pending), name, t.Name)
		ch <- prometheus.MustNewConstMetric(descDead, prometheus.GaugeValue, float64(t.DeadLetters), name, t.Name)
		ch <- prometheus.MustNewConstMetric(descOldest, prometheus.GaugeValue, t.OldestPendingSeconds, name, t.Name)
		held := 0.0
		if t.Held {
			held = 1
		}
		ch <- prometheus.MustNewConstMetric(descHeld, prometheus.GaugeValue, held, name, t.Name)
	}
}
