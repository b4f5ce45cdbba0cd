package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
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

	// verifier checks relay-bolt-jq's signatures with shapingSecret.
	verifier *standardwebhooks.Webhook
	// sampled is set once the first signed request since reset has been
	// checked, and shaped holds what the check found: one request a run
	// is enough to show the shaping was applied, and checking every one
	// would load the generator's core.
	sampled atomic.Bool
	shaped  atomic.Pointer[shapingCheck]

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
	v, err := standardwebhooks.NewWebhook(shapingSecret)
	if err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("standard webhooks secret: %w", err)
	}
	t := &target{addr: ln.Addr().String(), seen: make(map[string]struct{}), quit: make(chan struct{}), verifier: v}
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
	t.shaped.Store(nil)
	t.sampled.Store(false)
}

func (t *target) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t.requests.Add(1)
	if r.Header.Get(standardwebhooks.HeaderWebhookSignature) != "" && t.sampled.CompareAndSwap(false, true) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.shaped.Store(&shapingCheck{err: fmt.Errorf("reading the body: %w", err)})
		} else {
			t.shaped.Store(t.checkShaped(r.Header, body))
		}
	}
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

// shapingCheck is what the target found in the first signed request
// since its reset.
type shapingCheck struct {
	body string
	err  error
}

// checkShaped verifies a relay-bolt-jq request: the Standard Webhooks
// signature, by the scheme's reference library, over a form body holding
// the fields shapingJQ picks.
func (t *target) checkShaped(h http.Header, body []byte) *shapingCheck {
	c := &shapingCheck{body: string(body)}
	if err := t.verifier.Verify(body, h); err != nil {
		c.err = fmt.Errorf("signature: %w", err)
		return c
	}
	if ct := h.Get("Content-Type"); ct != "application/x-www-form-urlencoded" {
		c.err = fmt.Errorf("content type %q, want application/x-www-form-urlencoded", ct)
		return c
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		c.err = fmt.Errorf("form body: %w", err)
		return c
	}
	keys := make([]string, 0, len(form))
	for k := range form {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if !slices.Equal(keys, shapingFields) {
		c.err = fmt.Errorf("form fields %s, want %s", strings.Join(keys, ","), strings.Join(shapingFields, ","))
		return c
	}
	if id := form.Get("id"); len(id) != idLen {
		c.err = fmt.Errorf("form id %q is not an address_verification_id of %d hex digits", id, idLen)
	}
	return c
}

// shapingNote says what the check of a relay-bolt-jq run found, for its
// row.
func (t *target) shapingNote() string {
	c := t.shaped.Load()
	switch {
	case c == nil:
		return "SHAPING NOT CHECKED: the target got no signed request"
	case c.err != nil:
		return fmt.Sprintf("SHAPING CHECK FAILED: %v (body %q)", c.err, c.body)
	default:
		return fmt.Sprintf("one request checked: signature verified (Standard Webhooks reference library), form body %s", c.body)
	}
}
