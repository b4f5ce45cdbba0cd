package relay

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitFor polls cond every few milliseconds until it holds, and fails the
// test if it does not within timeout.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// fakeClock is an engine clock that moves only when told.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// wake makes e's workers look at their queues again. Their timers run on
// real time, so a fake clock's jump goes unseen until then.
func wake(e *Engine) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if w, ok := e.st.(interface{ Wake() }); ok {
		w.Wake()
	}
	for _, t := range e.targets {
		t.brk.wake()
	}
}

// request is what a test target saw of one request.
type request struct {
	Header http.Header
	Body   []byte
}

// testTarget is an httptest server on 127.0.0.1 that records every request
// and answers with handle (200 when nil).
type testTarget struct {
	*httptest.Server
	handle func(w http.ResponseWriter, r *http.Request, n int) // n: 0-based request number

	mu       sync.Mutex
	reqs     []request
	inflight atomic.Int32
	maxIn    atomic.Int32
}

func newTestTarget(t testing.TB, handle func(w http.ResponseWriter, r *http.Request, n int)) *testTarget {
	t.Helper()
	tt := &testTarget{handle: handle}
	tt.Server = httptest.NewServer(http.HandlerFunc(tt.serve))
	t.Cleanup(tt.Close)
	return tt
}

// newHangingTarget holds every request until release is called; the
// test's cleanup calls it too, before the server closes.
func newHangingTarget(t *testing.T) (target *testTarget, release func()) {
	t.Helper()
	ch := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(ch) }) }
	target = newTestTarget(t, func(_ http.ResponseWriter, r *http.Request, _ int) {
		select {
		case <-ch:
		case <-r.Context().Done():
		}
	})
	t.Cleanup(release)
	return target, release
}

func (tt *testTarget) serve(w http.ResponseWriter, r *http.Request) {
	in := tt.inflight.Add(1)
	defer tt.inflight.Add(-1)
	for {
		m := tt.maxIn.Load()
		if in <= m || tt.maxIn.CompareAndSwap(m, in) {
			break
		}
	}
	body, _ := io.ReadAll(r.Body)
	tt.mu.Lock()
	n := len(tt.reqs)
	tt.reqs = append(tt.reqs, request{Header: r.Header.Clone(), Body: body})
	tt.mu.Unlock()
	if tt.handle != nil {
		tt.handle(w, r, n)
	}
}

func (tt *testTarget) requests() []request {
	tt.mu.Lock()
	defer tt.mu.Unlock()
	return append([]request(nil), tt.reqs...)
}

func (tt *testTarget) count() int {
	tt.mu.Lock()
	defer tt.mu.Unlock()
	return len(tt.reqs)
}

// memStore opens a fresh memory store; now, if given, is its clock (the
// engine's).
func memStore(now ...func() time.Time) func() (store.Store, error) {
	return func() (store.Store, error) { return store.NewMemory(store.MemoryOptions{Now: clockOf(now)}), nil }
}

// boltStore opens the bbolt file at path; now, if given, is its clock.
func boltStore(path string, now ...func() time.Time) func() (store.Store, error) {
	return func() (store.Store, error) {
		return store.OpenBolt(path, store.BoltOptions{Timeout: time.Second, Now: clockOf(now)})
	}
}

func clockOf(now []func() time.Time) func() time.Time {
	if len(now) == 0 {
		return nil
	}
	return now[0]
}

func tempBolt(t testing.TB) string {
	t.Helper()
	return filepath.Join(t.TempDir(), "relay.db")
}

// openEngine makes and opens an engine that the test closes at its end,
// and waits until the store's backlog is loaded.
func openEngine(t testing.TB, cfg Config, opts Options) *Engine {
	t.Helper()
	e, err := New(cfg, opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := e.Open(); err != nil {
		t.Fatalf("Open: %v", err)
	}
	<-e.Loaded()
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return e
}

// fastTarget is a target config with short retry delays for tests.
func fastTarget(name, url string) TargetConfig {
	return TargetConfig{
		Name:        name,
		URL:         url,
		Timeout:     5 * time.Second,
		BackoffMin:  5 * time.Millisecond,
		BackoffMax:  50 * time.Millisecond,
		MaxAttempts: 100,
		Concurrency: 2,
	}
}

func receive(t testing.TB, e *Engine, body string) Result {
	t.Helper()
	res, err := e.Receive(t.Context(), []byte(body), "application/json")
	if err != nil {
		t.Fatalf("Receive(%s): %v", body, err)
	}
	return res
}

func mustAccept(t testing.TB, e *Engine, body string) store.ID {
	t.Helper()
	res := receive(t, e, body)
	if res.Duplicate {
		t.Fatalf("Receive(%s): duplicate, want accepted", body)
	}
	return res.EventID
}

func mustDuplicate(t testing.TB, e *Engine, body string) store.ID {
	t.Helper()
	res := receive(t, e, body)
	if !res.Duplicate {
		t.Fatalf("Receive(%s): accepted, want duplicate", body)
	}
	return res.EventID
}

func v3Body(id string) string {
	return `{"event_type":"address_verification.completed","event_id":"` + id + `","api_version":"v3","data":{"status":"verified"}}`
}

// deadLetters returns every dead letter of e.
func deadLetters(t testing.TB, e *Engine) []store.DeadLetter {
	t.Helper()
	var all []store.DeadLetter
	cursor := ""
	for {
		list, next, err := e.DeadLetters(t.Context(), "", cursor, 100)
		if err != nil {
			t.Fatalf("DeadLetters: %v", err)
		}
		all = append(all, list...)
		if next == "" {
			return all
		}
		cursor = next
	}
}

func targetStats(e *Engine, name string) TargetStats {
	for _, s := range e.Overview(context.Background()).Targets {
		if s.Name == name {
			return s
		}
	}
	return TargetStats{Name: name}
}
