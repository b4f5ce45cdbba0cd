package relay

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// The engine keeps the last hour of its counts in memory, at a fixed
// resolution, for the console's charts: a person looking at a stuck
// target should not need a Prometheus to see since when. Memory is
// bounded: HistorySteps slots per series, a series per intake result
// and per (target, outcome), and a pending series per target.
const (
	HistoryStep  = 10 * time.Second
	HistorySteps = 360
)

// History is a relay's last hour, one value per HistoryStep, oldest
// first; the last value is the step in progress.
type History struct {
	Step time.Duration `json:"step"`
	// End is when the last step ends; Now when the history was read,
	// within the last step.
	End time.Time `json:"end"`
	Now time.Time `json:"now"`
	// Intake counts answered requests by result (received_total).
	Intake map[string][]int64 `json:"intake"`
	// Deliveries counts outcomes by target, then result
	// (deliveries_total).
	Deliveries map[string]map[string][]int64 `json:"deliveries"`
	// Pending is each target's pending count at the step's last
	// sample, -1 for a step without one (the engine was not open).
	Pending map[string][]int64 `json:"pending"`
}

// Rate is the mean per second of a count series over the last window
// (whole steps; the step in progress counts for its elapsed part).
func (h History) Rate(series []int64, window time.Duration) float64 {
	n := int(window / h.Step)
	if n <= 0 || len(series) == 0 {
		return 0
	}
	elapsed := h.Step - h.End.Sub(h.Now)
	if elapsed < 0 || elapsed > h.Step {
		elapsed = h.Step
	}
	// The partial step and the n-1 before it, so that the window moves
	// smoothly rather than by a step at a time.
	n = min(n, len(series))
	var sum int64
	for _, v := range series[len(series)-n:] {
		sum += max(v, 0)
	}
	span := time.Duration(n-1)*h.Step + elapsed
	if span <= 0 {
		return 0
	}
	return float64(sum) / span.Seconds()
}

func stepOf(t time.Time) int64 { return t.UnixNano() / int64(HistoryStep) }

// ring is one series: slots[s%HistorySteps] holds step s, for the
// HistorySteps steps up to last.
type ring struct {
	mu    sync.Mutex
	last  int64
	slots [HistorySteps]int64
	// gauge: a slot holds its value plus one, zero meaning no sample.
	gauge bool
}

// advance moves the window to end at step s, clearing the steps it
// passes over. The caller holds mu.
func (r *ring) advance(s int64) {
	if s <= r.last {
		return
	}
	if s-r.last >= HistorySteps {
		clear(r.slots[:])
	} else {
		for i := r.last + 1; i <= s; i++ {
			r.slots[i%HistorySteps] = 0
		}
	}
	r.last = s
}

// add counts n at t. A time before the window (the clock stepped
// back an hour) is dropped.
func (r *ring) add(t time.Time, n int64) {
	s := stepOf(t)
	r.mu.Lock()
	r.advance(s)
	if s > r.last-HistorySteps {
		r.slots[s%HistorySteps] += n
	}
	r.mu.Unlock()
}

// set records a gauge's value at t.
func (r *ring) set(t time.Time, v int64) {
	s := stepOf(t)
	r.mu.Lock()
	r.advance(s)
	if s > r.last-HistorySteps {
		r.slots[s%HistorySteps] = max(v, 0) + 1
	}
	r.mu.Unlock()
}

// read returns the HistorySteps steps ending with step end, and
// whether any holds something.
func (r *ring) read(end int64) ([]int64, bool) {
	out := make([]int64, HistorySteps)
	any := false
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range out {
		s := end - HistorySteps + 1 + int64(i)
		v := int64(0)
		if s <= r.last && s > r.last-HistorySteps {
			v = r.slots[s%HistorySteps]
		}
		if r.gauge {
			v--
		}
		if v > 0 || (r.gauge && v >= 0) {
			any = true
		}
		out[i] = v
	}
	return out, any
}

// history holds an engine's series by name. Series are made on first
// use and live as long as the engine; a snapshot leaves out those of
// targets no longer configured that hold nothing in the window.
type history struct {
	mu         sync.Mutex
	intake     map[string]*ring
	deliveries map[string]map[string]*ring
	pending    map[string]*ring
}

func newHistory() *history {
	return &history{intake: map[string]*ring{}, deliveries: map[string]map[string]*ring{}, pending: map[string]*ring{}}
}

func (h *history) intakeRing(result string) *ring {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.intake[result]
	if r == nil {
		r = new(ring)
		h.intake[result] = r
	}
	return r
}

func (h *history) deliveryRing(target, result string) *ring {
	h.mu.Lock()
	defer h.mu.Unlock()
	byResult := h.deliveries[target]
	if byResult == nil {
		byResult = map[string]*ring{}
		h.deliveries[target] = byResult
	}
	r := byResult[result]
	if r == nil {
		r = new(ring)
		byResult[result] = r
	}
	return r
}

func (h *history) pendingRing(target string) *ring {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.pending[target]
	if r == nil {
		r = &ring{gauge: true}
		h.pending[target] = r
	}
	return r
}

// snapshot reads every series up to now's step. configured says
// whether a target is in the config; the others are dropped once their
// series are empty.
func (h *history) snapshot(now time.Time, configured func(string) bool) History {
	end := stepOf(now)
	out := History{
		Step: HistoryStep, End: time.Unix(0, (end+1)*int64(HistoryStep)), Now: now,
		Intake: map[string][]int64{}, Deliveries: map[string]map[string][]int64{}, Pending: map[string][]int64{},
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for result, r := range h.intake {
		out.Intake[result], _ = r.read(end)
	}
	for target, byResult := range h.deliveries {
		series := map[string][]int64{}
		keep := configured(target)
		for result, r := range byResult {
			var any bool
			series[result], any = r.read(end)
			keep = keep || any
		}
		if !keep {
			delete(h.deliveries, target)
			continue
		}
		out.Deliveries[target] = series
	}
	for target, r := range h.pending {
		series, any := r.read(end)
		if !configured(target) && !any {
			delete(h.pending, target)
			continue
		}
		out.Pending[target] = series
	}
	return out
}

// counter is a Prometheus counter and its series in the history.
type counter struct {
	prom prometheus.Counter
	hist *ring
}

func (c counter) inc(now time.Time) {
	c.prom.Inc()
	c.hist.add(now, 1)
}

// History returns the relay's last hour. Pending is as last sampled:
// once a step, and by each Overview, which reads the store's counts
// anyway (a page that shows both reads them once).
func (e *Engine) History() History {
	return e.hist.snapshot(e.now(), func(target string) bool {
		e.mu.RLock()
		defer e.mu.RUnlock()
		_, ok := e.targets[target]
		return ok
	})
}

// samplePending records every target's pending count once a step, so
// the console can chart a backlog's growth and drain.
func (e *Engine) samplePending() {
	defer e.wg.Done()
	tick := time.NewTicker(HistoryStep)
	defer tick.Stop()
	for {
		e.recordPending(e.ctx)
		select {
		case <-e.ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (e *Engine) recordPending(ctx context.Context) {
	counts, err := e.counts(ctx)
	if err != nil {
		// A store that is down leaves a gap in the chart; store_up and
		// the log say why.
		return
	}
	e.recordPendingFrom(counts)
}

// recordPendingFrom records every target's pending count in counts, and
// zero for a configured target counts does not name.
func (e *Engine) recordPendingFrom(counts store.Counts) {
	now := e.now()
	for name, c := range counts.Targets {
		e.hist.pendingRing(name).set(now, int64(c.Pending))
	}
	e.mu.RLock()
	idle := make([]string, 0, len(e.targets))
	for name := range e.targets {
		if _, ok := counts.Targets[name]; !ok {
			idle = append(idle, name)
		}
	}
	e.mu.RUnlock()
	for _, name := range idle {
		e.hist.pendingRing(name).set(now, 0)
	}
}
