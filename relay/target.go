package relay

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// target is one internal endpoint at run time: its settings, its queue in
// the store, the breaker and pacer in front of it, and its workers.
type target struct {
	name  string
	cfg   atomic.Pointer[settings]
	q     store.Queue
	brk   *breaker
	pace  *pacer
	pause *pauseGate
	quit  chan struct{} // closed when the target leaves the config

	// attempting counts the workers past the burst hold (burst.go).
	attempting atomic.Int64

	mu      sync.Mutex
	running int // workers alive; while above concurrency, the next to look leaves
	// look is cancelled to make workers waiting for a delivery look at
	// their settings again (a lower concurrency), then replaced.
	look       context.Context
	lookCancel context.CancelFunc

	metrics atomic.Pointer[targetMetrics] // swapped when the relay is renamed
}

// targetMetrics are a target's metric children, resolved once per name.
type targetMetrics struct {
	delivered, retried, dead, stale counter
	attemptDur, latency             prometheus.Observer
}

func (e *Engine) targetMetrics(relayName, target string) *targetMetrics {
	return &targetMetrics{
		delivered:  counter{e.m.Deliveries.WithLabelValues(relayName, target, "delivered"), e.hist.deliveryRing(target, "delivered")},
		retried:    counter{e.m.Deliveries.WithLabelValues(relayName, target, "retried"), e.hist.deliveryRing(target, "retried")},
		dead:       counter{e.m.Deliveries.WithLabelValues(relayName, target, "dead_lettered"), e.hist.deliveryRing(target, "dead_lettered")},
		stale:      counter{e.m.Deliveries.WithLabelValues(relayName, target, "stale"), e.hist.deliveryRing(target, "stale")},
		attemptDur: e.m.AttemptDuration.WithLabelValues(relayName, target),
		latency:    e.m.DeliveryLatency.WithLabelValues(relayName, target),
	}
}

// settings are a target's config and what is built from it once per
// config load: the pipeline that shapes its requests, and the HTTP client
// (kept across reloads that do not change its TLS, with its connections).
type settings struct {
	TargetConfig
	shape  *shape.Pipeline
	client *retryablehttp.Client
	conns  *http.Transport // the client's, to close its connections
}

// build compiles tc's pipeline and, unless old has the same TLS, makes
// its client; old may be nil.
func build(c *Config, tc TargetConfig, old *settings) (*settings, error) {
	p, err := shape.Compile(shapeSpec(c, &tc))
	if err != nil {
		return nil, fmt.Errorf("target %s: %w", tc.Name, err)
	}
	s := &settings{TargetConfig: tc, shape: p}
	if old != nil && reflect.DeepEqual(old.TLS, tc.TLS) {
		s.client, s.conns = old.client, old.conns
		return s, nil
	}
	tlsConf, err := clientTLS(tc.TLS)
	if err != nil {
		return nil, fmt.Errorf("target %s: %w", tc.Name, err)
	}
	s.client, s.conns = newClient(tc.Concurrency, tlsConf)
	return s, nil
}

// shapeSpec is what the pipeline needs of a target's settings.
func shapeSpec(c *Config, tc *TargetConfig) shape.Spec {
	return shape.Spec{
		Okhi:           c.Source == SourceOkHi,
		Method:         tc.Method,
		URL:            tc.URL,
		Headers:        tc.Headers,
		DocumentedOnly: tc.DocumentedOnly,
		Transform:      tc.Transform,
		TransformName:  tc.TransformName,
		ContentType:    tc.ContentType,
		Form:           tc.BodyFormat == BodyForm,
		Secrets:        tc.Sign,
		MaxBody:        c.MaxBody,
	}
}

// leaseFor is how long a taken delivery stays leased without an answer:
// the attempt's timeout and a margin for settling it. On a shared store
// another instance takes the delivery after that (the contract allows the
// timeout plus 10 s).
func leaseFor(tc *TargetConfig) store.QueueOptions {
	return store.QueueOptions{Lease: tc.Timeout + 5*time.Second, Ordered: tc.OrderBy != ""}
}

// newTarget opens the queue of s's target in the store; the caller starts
// its workers.
func (e *Engine) newTarget(s *settings) (*target, error) {
	q, err := e.st.Queue(s.Name, leaseFor(&s.TargetConfig))
	if err != nil {
		return nil, err
	}
	t := &target{
		name:  s.Name,
		q:     q,
		brk:   newBreaker(),
		pace:  newPacer(s.Rate),
		pause: newPauseGate(),
		quit:  make(chan struct{}),
	}
	t.look, t.lookCancel = context.WithCancel(e.ctx)
	t.cfg.Store(s)
	t.metrics.Store(e.targetMetrics(e.cfg.Name, s.Name))
	return t, nil
}

// lookAgain makes every worker of t waiting for a delivery look at its
// settings again.
func (t *target) lookAgain(parent context.Context) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lookCancel()
	t.look, t.lookCancel = context.WithCancel(parent)
}

func (t *target) lookContext() context.Context {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.look
}

// stop ends t's workers for good (removed from the config, or closing).
func (t *target) stop() {
	t.mu.Lock()
	t.lookCancel()
	t.mu.Unlock()
	t.cfg.Load().conns.CloseIdleConnections()
}

// startWorkers brings t's workers up to its concurrency; surplus workers
// leave after their current attempt.
func (e *Engine) startWorkers(t *target) {
	want := t.cfg.Load().Concurrency
	t.mu.Lock()
	defer t.mu.Unlock()
	for ; t.running < want; t.running++ {
		e.wg.Add(1)
		go e.work(t)
	}
}

// surplus reports whether the calling worker should leave, and if so
// counts it out. Any worker may be the one: numbering them instead lets a
// busy high-numbered worker outlive a lowering of the concurrency, and the
// next raise would start a second worker under its number, leaving the
// target short of workers after the following lowering.
func (t *target) surplus() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.running > t.cfg.Load().Concurrency {
		t.running--
		return true
	}
	return false
}

func (t *target) leave() {
	t.mu.Lock()
	t.running--
	t.mu.Unlock()
}

// work takes t's due deliveries one at a time and attempts them.
func (e *Engine) work(t *target) {
	defer e.wg.Done()
	for {
		select {
		case <-e.ctx.Done():
			return
		case <-t.quit:
			t.leave()
			return
		default:
		}
		if t.surplus() {
			return
		}
		look := t.lookContext()
		if !e.burst.enter(look, t) {
			continue // ctx done, quit, or told to look at the settings again
		}
		e.workOnce(t, look)
		e.burst.leave(t)
	}
}

// workOnce takes one due delivery of t and attempts it, unless t is
// paused, its breaker or rate holds it, or look ends first.
func (e *Engine) workOnce(t *target, look context.Context) {
	if !t.pause.wait(look) {
		return // ctx done, quit, or told to look at the settings again
	}
	probe, ok := t.brk.enter(look, e.now)
	if !ok {
		return // ctx done, quit, or told to look at the settings again
	}
	if probe && !e.claimProbe(t, &t.cfg.Load().TargetConfig) {
		return // another instance's probe is out
	}
	gate, ok := t.pace.enter(look)
	if !ok {
		e.leaveBreaker(t, probe, false)
		return
	}
	lease, err := t.q.Take(look)
	if err != nil {
		t.pace.leave(gate)
		e.leaveBreaker(t, probe, false)
		if errors.Is(err, store.ErrClosed) || look.Err() != nil {
			if errors.Is(err, store.ErrClosed) && look.Err() == nil {
				// Retired or closing: wait for quit or the engine's end.
				select {
				case <-e.ctx.Done():
				case <-t.quit:
				case <-look.Done():
				}
			}
			return
		}
		e.takeFailed(t, err)
		return
	}
	if !t.pause.open() || (!probe && t.brk.isHeld()) {
		// Paused, or held by the breaker (tripped here, or read from
		// another instance's record), while this worker waited in the
		// queue: the delivery goes back as it was, with no attempt
		// used, and only probes go out.
		lease.Postpone(e.now())
		t.pace.leave(gate)
		e.leaveBreaker(t, probe, false)
		return
	}
	e.leaveBreaker(t, probe, e.attempt(t, lease, probe, gate))
}

// takeFailed logs a store that could not hand out a delivery (a shared
// store that lost its server, a read error) and pauses the worker a
// little, so that a failing store is not asked in a loop.
func (e *Engine) takeFailed(t *target, err error) {
	if e.logEvery(&e.takeLogged, 10*time.Second) {
		e.log.Error("taking a delivery from the store", zap.String("target", t.name), zap.Error(err))
	}
	pause := time.NewTimer(time.Second)
	defer pause.Stop()
	select {
	case <-pause.C:
	case <-e.ctx.Done():
	case <-t.quit:
	}
}
