package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Target modes.
const (
	modeHealthy int32 = iota
	modeSlow          // answers 200 after slowDelay
	modeDown          // answers 503 at once
)

const slowDelay = 2 * time.Second

// target is the "internal service": it answers the relay (or
// reverse_proxy) and counts the events it received by Idempotency-Key.
type target struct {
	mode atomic.Int32
	addr string
	srv  *http.Server
	quit chan struct{} // closed on Close to release slow handlers

	mu   sync.Mutex
	seen map[string]struct{}

	requests    atomic.Int64 // every request, whatever the answer
	unique      atomic.Int64 // distinct Idempotency-Keys answered 200
	redelivered atomic.Int64 // a key answered 200 before came again
	unkeyed     atomic.Int64 // 200s without Idempotency-Key (reverse_proxy)
	refused     atomic.Int64 // 503s given while down
}

func startTarget() (*target, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	t := &target{addr: ln.Addr().String(), seen: make(map[string]struct{}), quit: make(chan struct{})}
	t.srv = &http.Server{Handler: t, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}
	go func() { _ = t.srv.Serve(ln) }()
	return t, nil
}

func (t *target) Close() {
	close(t.quit)
	_ = t.srv.Close()
}

// reset forgets what was received: each fresh store starts a fresh count.
func (t *target) reset() {
	t.mu.Lock()
	t.seen = make(map[string]struct{})
	t.mu.Unlock()
	t.requests.Store(0)
	t.unique.Store(0)
	t.redelivered.Store(0)
	t.unkeyed.Store(0)
	t.refused.Store(0)
}

func (t *target) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t.requests.Add(1)
	_, _ = io.Copy(io.Discard, r.Body)
	switch t.mode.Load() {
	case modeDown:
		t.refused.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	case modeSlow:
		tm := time.NewTimer(slowDelay)
		select {
		case <-tm.C:
		case <-r.Context().Done():
			tm.Stop()
			return
		case <-t.quit:
			tm.Stop()
			return
		}
	}
	if key := r.Header.Get("Idempotency-Key"); key != "" {
		t.mu.Lock()
		_, dup := t.seen[key]
		if !dup {
			t.seen[key] = struct{}{}
		}
		t.mu.Unlock()
		if dup {
			t.redelivered.Add(1)
		} else {
			t.unique.Add(1)
		}
	} else {
		t.unkeyed.Add(1)
	}
	w.Header()["Content-Length"] = []string{"0"}
	w.WriteHeader(http.StatusOK)
}

// waitUnique waits until the target has seen want distinct events or
// timeout passes; it returns when the last of them arrived (zero if not
// all did) and the time of the first one seen after start.
func (t *target) waitUnique(ctx context.Context, want int64, timeout time.Duration) (last, first time.Time) {
	start := time.Now()
	base := t.unique.Load()
	deadline := start.Add(timeout)
	for {
		n := t.unique.Load()
		now := time.Now()
		if first.IsZero() && n > base {
			first = now
		}
		if n >= want {
			return now, first
		}
		if now.After(deadline) || ctx.Err() != nil {
			return time.Time{}, first
		}
		time.Sleep(5 * time.Millisecond)
	}
}
