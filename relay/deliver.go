package relay

import (
	"bytes"
	"container/heap"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// Headers of forwarded requests.
const (
	HeaderIdempotencyKey = "Idempotency-Key"
	HeaderAttempt        = "X-Webhook-Relay-Attempt"
	HeaderTarget         = "X-Webhook-Relay-Target"
)

// UserAgent names the relay and its version in forwarded requests.
var UserAgent = "caddy-webhook-relay/" + Version

// target is one internal endpoint at run time.
type target struct {
	name   string
	cfg    atomic.Pointer[TargetConfig]
	q      queue
	counts *counts
	client *retryablehttp.Client
	conns  *http.Transport // the client's, to close its connections
	quit   chan struct{}   // closed when the target leaves the config

	mu      sync.Mutex
	running int // workers alive; while above concurrency, the next to look leaves

	metrics atomic.Pointer[targetMetrics] // swapped when the relay is renamed
}

// targetMetrics are a target's metric children, resolved once per name.
type targetMetrics struct {
	delivered, retried, dead prometheus.Counter
	attemptDur, latency      prometheus.Observer
}

func (e *Engine) targetMetrics(relayName, target string) *targetMetrics {
	return &targetMetrics{
		delivered:  e.m.Deliveries.WithLabelValues(relayName, target, "delivered"),
		retried:    e.m.Deliveries.WithLabelValues(relayName, target, "retried"),
		dead:       e.m.Deliveries.WithLabelValues(relayName, target, "dead_lettered"),
		attemptDur: e.m.AttemptDuration.WithLabelValues(relayName, target),
		latency:    e.m.DeliveryLatency.WithLabelValues(relayName, target),
	}
}

func (e *Engine) newTarget(tc TargetConfig) *target {
	t := &target{
		name:   tc.Name,
		counts: e.countsOf(tc.Name),
		quit:   make(chan struct{}),
	}
	t.cfg.Store(&tc)
	relayName := e.cfg.Name
	t.metrics.Store(e.targetMetrics(relayName, tc.Name))
	t.client, t.conns = newClient(tc.Concurrency)
	return t
}

// newClient returns one target's HTTP client: go-retryablehttp making one
// attempt per call (the schedule between attempts is persisted by the
// engine), no redirects, no proxy from the environment, no compression
// (the target gets exactly the contract's headers), its own connections
// (so that one target's failures close no other target's).
//
// go-retryablehttp closes all idle connections after every failed
// attempt; against a target answering 503 that means a new TCP connection
// per attempt. The transport is wrapped so that the client cannot close
// them: the engine does, when the target goes or the engine closes.
func newClient(concurrency int) (*retryablehttp.Client, *http.Transport) {
	tr := &http.Transport{
		Proxy: nil,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		MaxIdleConns:          max(concurrency, 2) * 2,
		MaxIdleConnsPerHost:   max(concurrency, 2) * 2,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true,
	}
	return &retryablehttp.Client{
		HTTPClient: &http.Client{
			Transport: keepConns{tr},
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
		Logger:       nil,
		RetryMax:     0,
		RetryWaitMin: DefaultBackoffMin,
		RetryWaitMax: DefaultBackoffMax,
		CheckRetry:   CheckRetry,
		Backoff:      BackoffFunc,
		ErrorHandler: retryablehttp.PassthroughErrorHandler,
	}, tr
}

// keepConns is a RoundTripper without CloseIdleConnections.
type keepConns struct{ rt http.RoundTripper }

func (k keepConns) RoundTrip(r *http.Request) (*http.Response, error) { return k.rt.RoundTrip(r) }

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

func (e *Engine) work(t *target) {
	defer e.wg.Done()
	for {
		// Stop before taking another item: pop hands out due items
		// whatever the context, and with a large backlog every one of
		// them is due at once (a closing engine or a removed target
		// would otherwise go through its whole queue).
		select {
		case <-e.ctx.Done():
			return
		case <-t.quit:
			t.mu.Lock()
			t.running--
			t.mu.Unlock()
			return
		default:
		}
		if t.surplus() {
			t.q.wakeOne() // the wake-up this worker took may have been for an item
			return
		}
		it, ok := t.q.pop(e.ctx, t.quit, e.now)
		if !ok {
			continue // ctx done, quit, or woken to look at the settings again
		}
		if !e.attempt(t, it) {
			t.q.unheld(e.now().UnixNano())
		}
	}
}

// attempt makes one delivery attempt and settles it in the store. It
// reports whether the target was asked; when it was not (the delivery
// expired, or its event is gone or unreadable), a held target's next probe
// may go at once.
func (e *Engine) attempt(t *target, it item) (asked bool) {
	tc := t.cfg.Load() // this attempt's settings, whatever a reload does meanwhile
	d := it.delivery(t.name)
	now := e.now()
	if now.Sub(d.ReceivedAt) > tc.MaxAge {
		d.LastError = ReasonMaxAgeExceeded
		d.LastAttemptAt = now
		e.settle(t, tc, d, store.Dead)
		return false
	}
	ev, err := e.st.Event(d.ID)
	if errors.Is(err, store.ErrNotFound) {
		return false // deleted meanwhile
	}
	if err != nil {
		if e.ctx.Err() == nil {
			e.log.Error("reading event for delivery", zap.String("event_id", d.ID.String()), zap.String("target", t.name), zap.Error(err))
			d.NextAt = now.Add(tc.BackoffMin)
			t.q.push(itemOf(d))
		}
		return false
	}
	d.Attempts++
	if d.FirstAttemptAt.IsZero() {
		d.FirstAttemptAt = now
	}
	d.LastAttemptAt = now
	start := time.Now()
	resp, err := e.send(t.client, tc, ev, d.Attempts)
	t.metrics.Load().attemptDur.Observe(time.Since(start).Seconds())
	if errors.Is(err, errAbandoned) {
		return true // left pending as it was; the next start sends it again
	}
	verdict := Classify(resp, err)
	d.LastStatus, d.LastError = 0, ""
	if err != nil {
		d.LastError = err.Error()
	} else {
		d.LastStatus = resp.StatusCode
		if verdict != Done {
			d.LastError = describe(resp)
		}
		drain(resp)
	}
	e.breaker(t, tc, d, verdict, resp)
	switch {
	case verdict == Done:
		e.settle(t, tc, d, store.Delivered)
	case verdict == Reject:
		e.settle(t, tc, d, store.Dead)
	case d.Attempts >= tc.MaxAttempts:
		d.LastError = fmt.Sprintf("max attempts (%d) reached: %s", tc.MaxAttempts, d.LastError)
		e.settle(t, tc, d, store.Dead)
	default:
		next := e.now().Add(Backoff{Min: tc.BackoffMin, Max: tc.BackoffMax, Now: e.now}.Delay(d.Attempts, resp))
		if next.Sub(d.ReceivedAt) > tc.MaxAge {
			d.LastError = fmt.Sprintf("%s: %s", ReasonMaxAgeExceeded, d.LastError)
			e.settle(t, tc, d, store.Dead)
			return true
		}
		d.NextAt = next
		e.settle(t, tc, d, store.Retry)
	}
	return true
}

// breaker feeds an attempt's verdict to the target's breaker (see queue)
// and logs when it trips or releases.
func (e *Engine) breaker(t *target, tc *TargetConfig, d *store.Delivery, verdict Verdict, resp *http.Response) {
	if verdict != Again {
		if t.q.answered(e.now().UnixNano()) {
			e.log.Info("target answering again: its held deliveries resume",
				zap.String("target", t.name), zap.Int("last_status", d.LastStatus))
		}
		return
	}
	cooldown := func(n int) time.Duration {
		return Backoff{Min: tc.BackoffMin, Max: tc.BackoffMax, Now: e.now}.Delay(n, resp)
	}
	if t.q.failed(e.now().UnixNano(), tc.BackoffMin, cooldown, tc.Timeout+time.Second) {
		e.log.Warn("target failing: its deliveries are held, one probe at a time until it answers",
			zap.String("target", t.name), zap.Int("failures_in_a_row", tripAfter), zap.String("error", d.LastError))
	}
}

// settle records an attempt's outcome without waiting for it to be
// durable: the worker goes on to its next delivery, and the outcome shares
// its commit with acks and other outcomes. What follows from the outcome
// (gauges, a retry queued) happens once it is durable. A crash before then
// loses the outcome, so the attempt is made again: at least once.
func (e *Engine) settle(t *target, tc *TargetConfig, d *store.Delivery, o store.Outcome) {
	e.st.SettleLater(d, o, func(ch store.Change, err error) { e.settled(t, tc, d, o, ch, err) })
}

func (e *Engine) settled(t *target, tc *TargetConfig, d *store.Delivery, o store.Outcome, ch store.Change, err error) {
	if err != nil {
		// The store is closing or failing: the delivery stays pending as
		// last stored. While the engine runs, try it again later (at
		// least once: a delivered event may go out again); on shutdown
		// the next start sends it.
		if e.ctx.Err() == nil {
			// A full disk fails every settle: log once in a while, not
			// once per delivery.
			if n := e.settleErrors.Add(1); e.logEvery(&e.settleLogged, 10*time.Second) {
				e.log.Error("recording delivery attempt", zap.String("event_id", d.ID.String()),
					zap.String("target", t.name), zap.Int64("failures_so_far", n), zap.Error(err))
			}
			d.NextAt = e.now().Add(tc.BackoffMax)
			t.q.push(itemOf(d))
		}
		return
	}
	// Counters first, gauges after: whoever sees nothing pending sees
	// the deliveries counted.
	defer func() {
		t.counts.pending.Add(int64(ch.Pending))
		t.counts.dead.Add(int64(ch.Dead))
		e.pendingEvents.Add(int64(ch.PendingEvents))
	}()
	switch o {
	case store.Delivered:
		m := t.metrics.Load()
		m.delivered.Inc()
		m.latency.Observe(e.now().Sub(d.ReceivedAt).Seconds())
		if ce := e.log.Check(zapcore.DebugLevel, "delivered"); ce != nil {
			ce.Write(zap.String("event_id", d.ID.String()), zap.String("target", t.name), zap.Int("attempt", d.Attempts))
		}
	case store.Retry:
		t.metrics.Load().retried.Inc()
		t.q.push(itemOf(d))
		if ce := e.log.Check(zapcore.DebugLevel, "delivery failed, will retry"); ce != nil {
			ce.Write(zap.String("event_id", d.ID.String()), zap.String("target", t.name), zap.Int("attempt", d.Attempts),
				zap.Time("next_attempt", d.NextAt), zap.String("error", d.LastError))
		}
	case store.Dead:
		t.metrics.Load().dead.Inc()
		e.log.Warn("delivery dead-lettered",
			zap.String("event_id", d.ID.String()), zap.String("target", t.name),
			zap.Int("attempt", d.Attempts), zap.Int("max_attempts", tc.MaxAttempts),
			zap.Int("last_status", d.LastStatus), zap.String("error", d.LastError))
	}
}

// send makes one HTTP attempt with exactly the contract's headers.
func (e *Engine) send(client *retryablehttp.Client, tc *TargetConfig, ev *store.Event, attempt int) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(e.ctx, tc.Timeout)
	req, err := retryablehttp.NewRequestWithContext(ctx, http.MethodPost, tc.URL, ev.Body)
	if err != nil {
		cancel()
		return nil, err
	}
	h := make(http.Header, 6+len(tc.Headers))
	for k, v := range tc.Headers {
		h[k] = v
	}
	if ev.ContentType != "" {
		h.Set("Content-Type", ev.ContentType)
	}
	if h.Get("User-Agent") == "" {
		h.Set("User-Agent", UserAgent)
	}
	h.Set(HeaderIdempotencyKey, ev.ID.String())
	h.Set(HeaderAttempt, strconv.Itoa(attempt))
	h.Set(HeaderTarget, tc.Name)
	req.Header = h
	resp, err := client.Do(req)
	if err != nil {
		if resp != nil {
			// CheckRetry reports a done context together with a response
			// that arrived meanwhile: close it, or its connection leaks.
			drain(resp)
		}
		cancel()
		if e.ctx.Err() != nil {
			return nil, errAbandoned
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("timeout after %s", tc.Timeout)
		}
		return nil, err
	}
	resp.Body = &cancelBody{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b *cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

// describe says what a failed response was, with the start of its body.
func describe(resp *http.Response) string {
	var buf [256]byte
	n, _ := io.ReadFull(resp.Body, buf[:])
	msg := bytes.TrimSpace(buf[:n])
	if len(msg) == 0 {
		return resp.Status
	}
	return resp.Status + ": " + string(msg)
}

// drain reads what is left of a response (up to a bound) so that its
// connection can be reused, then closes it.
func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

// item is a pending delivery in a target's queue: small, since a restart
// may load a million of them.
type item struct {
	due      int64 // unix ns
	recv     int64
	first    int64
	attempts int32
	id       store.ID
}

func itemOf(d *store.Delivery) item {
	it := item{recv: d.ReceivedAt.UnixNano(), attempts: int32(d.Attempts), id: d.ID}
	if !d.NextAt.IsZero() {
		it.due = d.NextAt.UnixNano()
	}
	if !d.FirstAttemptAt.IsZero() {
		it.first = d.FirstAttemptAt.UnixNano()
	}
	return it
}

func (it item) delivery(target string) *store.Delivery {
	d := &store.Delivery{
		ID: it.id, Target: target, ReceivedAt: time.Unix(0, it.recv),
		Attempts: int(it.attempts),
	}
	if it.first != 0 {
		d.FirstAttemptAt = time.Unix(0, it.first)
	}
	return d
}

// queue holds a target's pending deliveries ordered by due time. Idle
// workers wait each on its own channel, and one item wakes one worker (a
// broadcast would wake every idle worker on every ack). One timer, armed
// for the earliest item not yet due, wakes a worker when it falls due.
type queue struct {
	mu      sync.Mutex
	h       itemHeap
	waiters []chan struct{}
	timer   *time.Timer
	timerAt int64 // unix ns the timer is armed for; 0 when not armed

	// The breaker: after tripAfter attempts in a row failed with a
	// retryable error and nothing succeeded for a while, the target is
	// taken for down. Its deliveries are held and one probe goes out at a
	// time, each after a cooldown on the target's backoff curve; the first
	// answer other than a retryable error releases them all. Without it,
	// every pending delivery keeps its own retry schedule, and a large
	// backlog retries against a dead service thousands of times a second,
	// taking the CPU and the store's writer from the acks. The quiet
	// period keeps a flaky target that still answers now and then (runs of
	// ten failures are common at a high rate) from being held.
	fails     int   // retryable failures in a row
	lastOK    int64 // unix ns of the last answer that was not one
	held      bool
	probes    int   // failures since the breaker tripped
	holdUntil int64 // while held, no item is handed out before this
	probeFor  int64 // how long a handed-out probe holds the others (ns)
}

// tripAfter is how many retryable failures in a row trip the breaker,
// provided nothing succeeded for the target's backoff minimum.
const tripAfter = 10

// failed counts a retryable failure at now. Once held, nothing more is
// handed out for cooldown(n) (n: failures since the trip, from 1), and a
// probe then holds the others for at most probeFor. It reports whether
// this failure tripped the breaker.
func (q *queue) failed(now int64, quiet time.Duration, cooldown func(n int) time.Duration, probeFor time.Duration) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.fails++
	tripped := false
	if !q.held {
		if q.fails < tripAfter || now-q.lastOK < int64(quiet) {
			return false
		}
		q.held, q.probes, tripped = true, 0, true
	}
	q.probes++
	q.holdUntil = now + int64(cooldown(q.probes))
	q.probeFor = int64(probeFor)
	return tripped
}

// answered records, at now, an answer that is not a retryable failure and
// reports whether it released a held target.
func (q *queue) answered(now int64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.lastOK = now
	return q.releaseLocked()
}

// release forgets the failures (the target's settings changed) and
// reports whether that released a held target.
func (q *queue) release() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.releaseLocked()
}

func (q *queue) releaseLocked() bool {
	q.fails = 0
	if !q.held {
		return false
	}
	q.held, q.holdUntil = false, 0
	for _, w := range q.waiters {
		close(w)
	}
	q.waiters = q.waiters[:0]
	return true
}

// unheld lets the next probe go now: the item handed out as a probe was
// settled without an attempt (expired, or deleted meanwhile).
func (q *queue) unheld(now int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.held && q.holdUntil > now {
		q.holdUntil = now
		q.wakeOneLocked()
	}
}

// isHeld reports whether the breaker holds the target's deliveries.
func (q *queue) isHeld() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.held
}

type itemHeap []item

func (h itemHeap) Len() int           { return len(h) }
func (h itemHeap) Less(i, j int) bool { return h[i].due < h[j].due }
func (h itemHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *itemHeap) Push(x any)        { *h = append(*h, x.(item)) }
func (h *itemHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	return it
}

// pushAll queues a batch of items, for loading a backlog.
func (q *queue) pushAll(items []item) {
	q.mu.Lock()
	if len(items) >= len(q.h) {
		q.h = append(q.h, items...)
		heap.Init(&q.h)
	} else {
		for _, it := range items {
			heap.Push(&q.h, it)
		}
	}
	q.wakeOneLocked()
	q.mu.Unlock()
}

func (q *queue) push(it item) {
	q.mu.Lock()
	heap.Push(&q.h, it)
	q.wakeOneLocked()
	q.mu.Unlock()
}

func (q *queue) wakeOneLocked() {
	if n := len(q.waiters); n > 0 {
		close(q.waiters[n-1])
		q.waiters = q.waiters[:n-1]
	}
}

// wakeOne passes a wake-up on, from a worker that leaves.
func (q *queue) wakeOne() {
	q.mu.Lock()
	q.wakeOneLocked()
	q.mu.Unlock()
}

// wake makes every idle worker look again (at its settings, or at a clock
// that moved).
func (q *queue) wake() {
	q.mu.Lock()
	for _, w := range q.waiters {
		close(w)
	}
	q.waiters = q.waiters[:0]
	q.mu.Unlock()
}

// stop disarms the timer.
func (q *queue) stop() {
	q.mu.Lock()
	if q.timer != nil {
		q.timer.Stop()
	}
	q.timerAt = 0
	q.mu.Unlock()
}

// armLocked makes the timer fire at due, unless it fires earlier already.
func (q *queue) armLocked(due, now int64) {
	if q.timerAt != 0 && q.timerAt <= due {
		return
	}
	d := time.Duration(due - now)
	q.timerAt = due
	if q.timer == nil {
		q.timer = time.AfterFunc(d, q.fire)
		return
	}
	q.timer.Reset(d)
}

func (q *queue) fire() {
	q.mu.Lock()
	q.timerAt = 0
	q.wakeOneLocked()
	q.mu.Unlock()
}

// pop takes the earliest item if it is due, or waits for a wake-up. It
// returns false after a wake-up without an item, when ctx is done, or when
// quit is closed: the caller looks at its settings, then calls again.
func (q *queue) pop(ctx context.Context, quit <-chan struct{}, now func() time.Time) (item, bool) {
	q.mu.Lock()
	n := now().UnixNano()
	held := q.held && n < q.holdUntil
	if !held && len(q.h) > 0 && q.h[0].due <= n {
		it := heap.Pop(&q.h).(item)
		if q.held {
			q.holdUntil = n + q.probeFor // a probe: the others wait for its answer
		} else if len(q.h) > 0 && q.h[0].due <= n {
			q.wakeOneLocked() // more are due: let another idle worker take one
		}
		q.mu.Unlock()
		return it, true
	}
	if len(q.h) > 0 {
		at := q.h[0].due
		if held {
			at = max(at, q.holdUntil)
		}
		q.armLocked(at, n)
	}
	w := make(chan struct{})
	q.waiters = append(q.waiters, w)
	q.mu.Unlock()
	select {
	case <-w:
	case <-ctx.Done():
	case <-quit:
	}
	return item{}, false
}
