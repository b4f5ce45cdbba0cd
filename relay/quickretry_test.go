package relay

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// What a rawTarget does with a connection once it has read a request.
type rawAction uint8

const (
	serve rawAction = iota // answer 200 and keep the connection for more
	reset                  // reset it (RST), as a crashing target does
	hang                   // answer nothing until the client goes
)

// rawTarget is a TCP server on 127.0.0.1 that reads HTTP requests itself,
// so that it can reset a connection after reading a request, which no
// http.Handler can.
type rawTarget struct {
	l      net.Listener
	url    string
	action func(conn int) rawAction // conn: 0-based connection number

	conns atomic.Int64
	wg    sync.WaitGroup

	mu   sync.Mutex
	open map[net.Conn]bool
	reqs []http.Header
}

func newRawTarget(t *testing.T, action func(conn int) rawAction) *rawTarget {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rt := &rawTarget{l: l, url: "http://" + l.Addr().String() + "/hook", action: action, open: map[net.Conn]bool{}}
	rt.wg.Add(1)
	go rt.accept()
	t.Cleanup(func() {
		l.Close()
		rt.mu.Lock()
		for c := range rt.open {
			c.Close()
		}
		rt.mu.Unlock()
		rt.wg.Wait()
	})
	return rt
}

func (rt *rawTarget) accept() {
	defer rt.wg.Done()
	for {
		c, err := rt.l.Accept()
		if err != nil {
			return
		}
		n := int(rt.conns.Add(1) - 1)
		rt.mu.Lock()
		rt.open[c] = true
		rt.mu.Unlock()
		rt.wg.Add(1)
		go rt.handle(c, rt.action(n))
	}
}

func (rt *rawTarget) handle(c net.Conn, act rawAction) {
	defer rt.wg.Done()
	defer func() {
		rt.mu.Lock()
		delete(rt.open, c)
		rt.mu.Unlock()
		c.Close()
	}()
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		rt.mu.Lock()
		rt.reqs = append(rt.reqs, req.Header.Clone())
		rt.mu.Unlock()
		switch act {
		case reset:
			_ = c.(*net.TCPConn).SetLinger(0)
			return
		case hang:
			_, _ = io.Copy(io.Discard, br) // until the client closes
			return
		}
		if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"); err != nil {
			return
		}
	}
}

func (rt *rawTarget) requests() []http.Header {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return append([]http.Header(nil), rt.reqs...)
}

// pendingDelivery is the one delivery pending in st.
func pendingDelivery(t *testing.T, st *store.Memory) store.Delivery {
	t.Helper()
	var ds []store.Delivery
	err := st.Pending(func(d *store.Delivery) error {
		ds = append(ds, *d)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 1 {
		t.Fatalf("%d deliveries pending, want 1", len(ds))
	}
	return ds[0]
}

// TestQuickRetryAfterReset: a target that resets its first two
// connections after reading the request gets the event on the third,
// within the first attempt: same attempt number, same Idempotency-Key,
// nothing retried on the persisted schedule.
func TestQuickRetryAfterReset(t *testing.T) {
	target := newRawTarget(t, func(n int) rawAction {
		if n < 2 {
			return reset
		}
		return serve
	})
	core, logs := observer.New(zapcore.DebugLevel)
	m := NewMetrics()
	tc := fastTarget("t", target.url)
	tc.Concurrency = 1
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore(), Metrics: m, Logger: zap.New(core)})
	id := mustAccept(t, e, v3Body("reset-twice"))
	waitFor(t, "the delivery", 5*time.Second, func() bool {
		return testutil.ToFloat64(m.Deliveries.WithLabelValues(DefaultName, "t", "delivered")) == 1
	})
	if got := testutil.ToFloat64(m.Deliveries.WithLabelValues(DefaultName, "t", "retried")); got != 0 {
		t.Errorf("%v attempts retried on the schedule, want 0", got)
	}
	if got := target.conns.Load(); got != 3 {
		t.Errorf("%d connections, want 3 (two reset, one served)", got)
	}
	reqs := target.requests()
	if len(reqs) != 3 {
		t.Fatalf("target read %d requests, want 3", len(reqs))
	}
	for i, h := range reqs {
		if got := h.Get(HeaderAttempt); got != "1" {
			t.Errorf("try %d: %s %q, want 1", i+1, HeaderAttempt, got)
		}
		if got := h.Get(HeaderIdempotencyKey); got != id.String() {
			t.Errorf("try %d: %s %q, want %s", i+1, HeaderIdempotencyKey, got, id)
		}
	}
	delivered := logs.FilterMessage("delivered").All()
	if len(delivered) != 1 || delivered[0].ContextMap()["attempt"] != int64(1) {
		t.Errorf("delivered log lines %v, want one at attempt 1", delivered)
	}
}

// TestQuickRetryGivesUp: a target that resets every connection costs an
// attempt three tries; the delivery then waits on the persisted schedule,
// and its next attempt is attempt 2, again of three tries.
func TestQuickRetryGivesUp(t *testing.T) {
	target := newRawTarget(t, func(int) rawAction { return reset })
	clock := newFakeClock()
	st := store.NewMemory(store.MemoryOptions{Now: clock.Now})
	m := NewMetrics()
	tc := fastTarget("t", target.url)
	tc.Concurrency = 1
	tc.BackoffMin, tc.BackoffMax = time.Hour, time.Hour
	e := openEngine(t, Config{Targets: []TargetConfig{tc}},
		Options{OpenStore: func() (store.Store, error) { return st, nil }, Now: clock.Now, Metrics: m})
	mustAccept(t, e, v3Body("always-reset"))
	retried := func(n float64) func() bool {
		return func() bool { return testutil.ToFloat64(m.Deliveries.WithLabelValues(DefaultName, "t", "retried")) == n }
	}
	waitFor(t, "the first attempt settled", 5*time.Second, retried(1))
	if got := target.conns.Load(); got != 3 {
		t.Errorf("%d connections in the first attempt, want 3", got)
	}
	d := pendingDelivery(t, st)
	if d.Attempts != 1 || d.LastStatus != 0 {
		t.Errorf("delivery after the first attempt: attempts %d, last_status %d; want 1, 0", d.Attempts, d.LastStatus)
	}
	if !strings.Contains(d.LastError, "connection reset by peer") || !strings.Contains(d.LastError, "3 tries within the attempt") {
		t.Errorf("last_error %q, want the reset and the 3 tries", d.LastError)
	}
	if wait := d.NextAt.Sub(clock.Now()); wait != time.Hour {
		t.Errorf("next attempt in %s, want the backoff's 1h", wait)
	}

	clock.Advance(time.Hour)
	wake(e)
	waitFor(t, "the second attempt settled", 5*time.Second, retried(2))
	if got := target.conns.Load(); got != 6 {
		t.Errorf("%d connections after two attempts, want 6", got)
	}
	reqs := target.requests()
	if len(reqs) != 6 {
		t.Fatalf("target read %d requests, want 6", len(reqs))
	}
	for i, h := range reqs {
		if got, want := h.Get(HeaderAttempt), map[bool]string{true: "1", false: "2"}[i < 3]; got != want {
			t.Errorf("request %d: %s %q, want %s", i+1, HeaderAttempt, got, want)
		}
	}
	if d := pendingDelivery(t, st); d.Attempts != 2 {
		t.Errorf("attempts %d after the second attempt, want 2", d.Attempts)
	}
}

// TestNoQuickRetry: what is not a connection lost mid-request ends the
// attempt after one try: a timeout, a target with a rate (whose every
// request waits for it), and an attempt whose timeout falls during the
// quick retries' waits.
func TestNoQuickRetry(t *testing.T) {
	tests := []struct {
		name      string
		action    rawAction
		timeout   time.Duration
		rate      Rate
		maxConns  int64
		lastError string
	}{
		{"timeout", hang, 100 * time.Millisecond, Rate{}, 1, "timeout after 100ms"},
		{"rated target", reset, 5 * time.Second, Rate{N: 1000, Per: time.Second}, 1, "connection reset by peer"},
		// The waits before the second and third tries are at least 10ms
		// and 20ms: the third try cannot start within 25ms.
		{"timeout bounds the tries", reset, 25 * time.Millisecond, Rate{}, 2, "timeout after 25ms"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := newRawTarget(t, func(int) rawAction { return tt.action })
			st := store.NewMemory(store.MemoryOptions{})
			m := NewMetrics()
			tc := fastTarget("t", target.url)
			tc.Concurrency = 1
			tc.Timeout = tt.timeout
			tc.Rate = tt.rate
			tc.BackoffMin, tc.BackoffMax = time.Hour, time.Hour
			e := openEngine(t, Config{Targets: []TargetConfig{tc}},
				Options{OpenStore: func() (store.Store, error) { return st, nil }, Metrics: m})
			mustAccept(t, e, v3Body("no-quick-retry"))
			waitFor(t, "the attempt settled", 5*time.Second, func() bool {
				return testutil.ToFloat64(m.Deliveries.WithLabelValues(DefaultName, "t", "retried")) == 1
			})
			if got := target.conns.Load(); got < 1 || got > tt.maxConns {
				t.Errorf("%d connections, want 1 to %d", got, tt.maxConns)
			}
			d := pendingDelivery(t, st)
			if d.Attempts != 1 || !strings.Contains(d.LastError, tt.lastError) {
				t.Errorf("attempts %d, last_error %q; want 1 and %q", d.Attempts, d.LastError, tt.lastError)
			}
			if tt.maxConns == 1 && strings.Contains(d.LastError, "tries") {
				t.Errorf("last_error %q counts tries of a single try", d.LastError)
			}
		})
	}
}

// TestRefusedNotQuickRetried counts the connections an attempt dials: one
// for a refused connection (a down target is the schedule's and the
// breaker's), three for one reset every time.
func TestRefusedNotQuickRetried(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := "http://" + l.Addr().String() + "/hook"
	l.Close()
	resetting := newRawTarget(t, func(int) rawAction { return reset })

	tests := []struct {
		name  string
		url   string
		dials int64
		err   string
	}{
		{"refused", refused, 1, "connection refused"},
		{"reset", resetting.url, 3, "connection reset by peer (3 tries within the attempt)"},
	}
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("idle", resetting.url)}}, Options{OpenStore: memStore()})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Config{Targets: []TargetConfig{fastTarget("t", tt.url)}}.WithDefaults()
			if err != nil {
				t.Fatal(err)
			}
			s, err := build(&cfg, cfg.Targets[0], nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(s.conns.CloseIdleConnections)
			body := []byte(v3Body("dials"))
			req, err := s.shape.Build(t.Context(), shape.Input{ID: "x", Body: body, ContentType: "application/json"}, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			var dials atomic.Int64
			ctx := httptrace.WithClientTrace(t.Context(), &httptrace.ClientTrace{
				ConnectStart: func(string, string) { dials.Add(1) },
			})
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			resp, err := e.send(ctx, s, req, &store.Event{ID: cfg.EventID(body), Body: body}, 1)
			if err == nil {
				drain(resp)
				t.Fatal("send succeeded")
			}
			if errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("error %q, want %q", err, tt.err)
			}
			if got := dials.Load(); got != tt.dials {
				t.Errorf("%d connections dialled, want %d", got, tt.dials)
			}
		})
	}
}
