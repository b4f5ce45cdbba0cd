package relay

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

const namespace = "caddy_webhook_relay"

// Received results, the values of received_total's result label.
const (
	ResultAccepted     = "accepted"
	ResultDuplicate    = "duplicate"
	ResultUnauthorized = "unauthorized"
	ResultInvalid      = "invalid"
	ResultTooLarge     = "too_large"
	ResultUnavailable  = "unavailable"
)

// Metrics are the relay's Prometheus collectors. Create them once per
// process and register them in every registry that should expose them
// (Caddy makes a new registry per config): counters then keep their values
// across reloads. Gauges are read from the live engines at scrape time.
type Metrics struct {
	Received        *prometheus.CounterVec
	Deliveries      *prometheus.CounterVec
	AttemptDuration *prometheus.HistogramVec
	DeliveryLatency *prometheus.HistogramVec
	AckDuration     *prometheus.HistogramVec
	DedupeEvictions *prometheus.CounterVec

	mu      sync.Mutex
	engines map[*Engine]struct{}
}

// NewMetrics creates the collectors.
func NewMetrics() *Metrics {
	return &Metrics{
		Received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "received_total",
			Help: "Webhook requests received, by result.",
		}, []string{"relay", "result"}),
		Deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "deliveries_total",
			Help: "Delivery attempts by outcome: delivered, retried or dead_lettered; stale counts events not sent because a newer one of their drop_stale key was delivered.",
		}, []string{"relay", "target", "result"}),
		AttemptDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "delivery_attempt_duration_seconds",
			Help:    "Duration of one delivery attempt to a target.",
			Buckets: prometheus.DefBuckets,
		}, []string{"relay", "target"}),
		DeliveryLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "delivery_latency_seconds",
			Help:    "Time from receipt of an event to its successful delivery.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400},
		}, []string{"relay", "target"}),
		AckDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "ack_duration_seconds",
			Help:    "Time from the start of a request to its answer (the sender's budget is 15s).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 15},
		}, []string{"relay"}),
		DedupeEvictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "dedupe_evictions_total",
			Help: "Dedupe keys pushed out of the in-memory LRU before their TTL.",
		}, []string{"relay"}),
		engines: map[*Engine]struct{}{},
	}
}

var (
	descPending = prometheus.NewDesc(namespace+"_pending",
		"Events waiting for delivery to a target.", []string{"relay", "target"}, nil)
	descDead = prometheus.NewDesc(namespace+"_dead_letters",
		"Dead letters held for a target.", []string{"relay", "target"}, nil)
	descDedupe = prometheus.NewDesc(namespace+"_dedupe_entries",
		"Dedupe keys held in the in-memory LRU.", []string{"relay"}, nil)
	descOldest = prometheus.NewDesc(namespace+"_oldest_pending_seconds",
		"Age of the oldest event still waiting for a target.", []string{"relay", "target"}, nil)
	descHeld = prometheus.NewDesc(namespace+"_target_held",
		"1 while a target is taken for down: its deliveries wait while one probe at a time finds out whether it is back.", []string{"relay", "target"}, nil)
	descBurst = prometheus.NewDesc(namespace+"_burst_hold",
		"1 while a burst holds deliveries to an eighth of each target's concurrency so that acks get the CPU (at most burst_hold at a time).", []string{"relay"}, nil)
	descStoreUp = prometheus.NewDesc(namespace+"_store_up",
		"1 while the relay's store takes writes (bbolt open, NATS connected and its stream checked), else 0.", []string{"relay"}, nil)
)

// Collectors returns everything to register: the vectors and the gauges.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{
		m.Received, m.Deliveries, m.AttemptDuration, m.DeliveryLatency,
		m.AckDuration, m.DedupeEvictions, (*gauges)(m),
	}
}

// Register registers every collector in reg; collectors reg already holds
// (from an earlier config) are fine.
func (m *Metrics) Register(reg prometheus.Registerer) error {
	for _, c := range m.Collectors() {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

func (m *Metrics) add(e *Engine) {
	m.mu.Lock()
	m.engines[e] = struct{}{}
	m.mu.Unlock()
}

func (m *Metrics) remove(e *Engine) {
	m.mu.Lock()
	delete(m.engines, e)
	m.mu.Unlock()
}

// gauges reads the live engines' gauges at scrape time.
type gauges Metrics

func (g *gauges) Describe(ch chan<- *prometheus.Desc) {
	ch <- descPending
	ch <- descDead
	ch <- descDedupe
	ch <- descOldest
	ch <- descHeld
	ch <- descStoreUp
	ch <- descBurst
}

func (g *gauges) Collect(ch chan<- prometheus.Metric) {
	g.mu.Lock()
	engines := make([]*Engine, 0, len(g.engines))
	for e := range g.engines {
		engines = append(engines, e)
	}
	g.mu.Unlock()
	seen := map[string]bool{}
	for _, e := range engines {
		name := e.Name()
		if seen[name] {
			// During a reload that moves a relay to new storage, old and
			// new engines share a name for a moment.
			continue
		}
		seen[name] = true
		e.collect(ch)
	}
}
