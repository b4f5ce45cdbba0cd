package relay

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

func TestConfigWithDefaults(t *testing.T) {
	c, err := Config{Targets: []TargetConfig{{Name: "t", URL: "https://legacy.internal/hook"}}}.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if c.Name != DefaultName || c.Source != SourceOkHi || c.MaxBody != DefaultMaxBody || c.MaxPending != DefaultMaxPending ||
		c.RetryAfter != DefaultRetryAfter || c.Dedupe.Capacity != DefaultCapacity || c.Dedupe.TTL != DefaultTTL {
		t.Errorf("relay defaults not filled in: %+v", c)
	}
	tc := c.Targets[0]
	if tc.Timeout != DefaultTimeout || tc.MaxAttempts != DefaultMaxAttempts || tc.BackoffMin != DefaultBackoffMin ||
		tc.BackoffMax != DefaultBackoffMax || tc.MaxAge != DefaultMaxAge || tc.Concurrency != DefaultConcurrency {
		t.Errorf("target defaults not filled in: %+v", tc)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	good := TargetConfig{Name: "t", URL: "http://127.0.0.1:9090/"}
	tests := []struct {
		name string
		cfg  Config
		opts Options
		want string
	}{
		{"no store", Config{Targets: []TargetConfig{good}}, Options{}, "no store"},
		{"no targets", Config{}, Options{OpenStore: memStore()}, "at least one target"},
		{"unknown source", Config{Source: "github", Targets: []TargetConfig{good}}, Options{OpenStore: memStore()}, `unknown source "github"`},
		{"unnamed target", Config{Targets: []TargetConfig{{URL: good.URL}}}, Options{OpenStore: memStore()}, "no name"},
		{"duplicate target", Config{Targets: []TargetConfig{good, good}}, Options{OpenStore: memStore()}, `two targets named "t"`},
		{"bad scheme", Config{Targets: []TargetConfig{{Name: "t", URL: "ftp://x/"}}}, Options{OpenStore: memStore()}, "scheme must be http or https"},
		{"relative URL", Config{Targets: []TargetConfig{{Name: "t", URL: "/hook"}}}, Options{OpenStore: memStore()}, "bad URL"},
		{"no host", Config{Targets: []TargetConfig{{Name: "t", URL: "http:///hook"}}}, Options{OpenStore: memStore()}, "no host"},
		{"unparsable URL", Config{Targets: []TargetConfig{{Name: "t", URL: "http://[::1"}}}, Options{OpenStore: memStore()}, "bad URL"},
		{"backoff max below min", Config{Targets: []TargetConfig{{Name: "t", URL: good.URL, BackoffMin: time.Minute, BackoffMax: time.Second}}}, Options{OpenStore: memStore()}, "below min"},
		{"match without values", Config{Targets: []TargetConfig{{Name: "t", URL: good.URL, Match: []Match{{Path: "a"}}}}}, Options{OpenStore: memStore()}, "match needs"},
		{"match without path", Config{Targets: []TargetConfig{{Name: "t", URL: good.URL, Match: []Match{{Values: []string{"x"}}}}}}, Options{OpenStore: memStore()}, "match needs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := New(tt.cfg, tt.opts)
			if err == nil {
				t.Fatalf("New = %v, want an error", e)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not say %q", err, tt.want)
			}
		})
	}
}

func TestLifecycle(t *testing.T) {
	target := newTestTarget(t, nil)
	cfg := Config{Targets: []TargetConfig{fastTarget("t", target.URL)}}
	e, err := New(cfg, Options{OpenStore: memStore()})
	if err != nil {
		t.Fatal(err)
	}
	if !e.IsNew() || e.IsOpen() {
		t.Errorf("new engine: IsNew %v IsOpen %v", e.IsNew(), e.IsOpen())
	}
	if _, err := e.Receive(t.Context(), []byte(v3Body("a")), "application/json"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Receive before Open: error %v, want ErrUnavailable", err)
	}
	if err := e.Open(); err != nil {
		t.Fatal(err)
	}
	if err := e.Open(); err != nil {
		t.Errorf("second Open: %v", err)
	}
	if e.IsNew() || !e.IsOpen() {
		t.Errorf("open engine: IsNew %v IsOpen %v", e.IsNew(), e.IsOpen())
	}
	mustAccept(t, e, v3Body("a"))
	waitFor(t, "the delivery", 5*time.Second, func() bool { return target.count() == 1 })
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if e.IsOpen() {
		t.Error("closed engine says it is open")
	}
	for _, body := range []string{v3Body("a"), v3Body("b")} {
		if _, err := e.Receive(t.Context(), []byte(body), "application/json"); !errors.Is(err, ErrUnavailable) {
			t.Errorf("Receive after Close: error %v, want ErrUnavailable", err)
		}
	}
	if err := e.Open(); err == nil {
		t.Error("Open after Close succeeded")
	}
	if _, _, err := e.DeadLetters(t.Context(), "", "", 10); !errors.Is(err, ErrUnavailable) {
		t.Errorf("DeadLetters after Close: error %v, want ErrUnavailable", err)
	}
	if _, err := e.Replay(t.Context(), nil, ""); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Replay after Close: error %v, want ErrUnavailable", err)
	}
	if _, err := e.DeleteDead(t.Context(), store.ID{}, ""); !errors.Is(err, ErrUnavailable) {
		t.Errorf("DeleteDead after Close: error %v, want ErrUnavailable", err)
	}
	if _, err := e.ExpireKeys(t.Context()); !errors.Is(err, ErrUnavailable) {
		t.Errorf("ExpireKeys after Close: error %v, want ErrUnavailable", err)
	}
}

func TestCloseNeverOpened(t *testing.T) {
	e, err := New(Config{Targets: []TargetConfig{{Name: "t", URL: "http://127.0.0.1:1/"}}}, Options{OpenStore: memStore()})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Errorf("Close of a never opened engine: %v", err)
	}
	if err := e.Open(); err == nil {
		t.Error("Open after Close succeeded")
	}
}

func TestOpenStoreError(t *testing.T) {
	boom := errors.New("disk on fire")
	e, err := New(Config{Name: "edge", Targets: []TargetConfig{{Name: "t", URL: "http://127.0.0.1:1/"}}},
		Options{OpenStore: func() (store.Store, error) { return nil, boom }})
	if err != nil {
		t.Fatal(err)
	}
	err = e.Open()
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "edge") {
		t.Errorf("Open error = %v, want one wrapping the store's and naming the relay", err)
	}
	if e.IsOpen() {
		t.Error("engine open although its store is not")
	}
	if _, err := e.Receive(t.Context(), []byte(v3Body("a")), "application/json"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Receive: error %v, want ErrUnavailable", err)
	}
	if err := e.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// flakyStore fails the next n Accepts, with err (a full disk when nil).
type flakyStore struct {
	store.Store
	fail atomic.Int32
	err  error
}

func (s *flakyStore) Accept(ctx context.Context, ev *store.Event, targets []string, opts store.AcceptOptions) (bool, error) {
	if s.fail.Add(-1) >= 0 {
		if s.err != nil {
			return false, s.err
		}
		return false, errors.New("write failed: no space left on device")
	}
	return s.Store.Accept(ctx, ev, targets, opts)
}

// TestReceiveTooLargeForStore: an event the store can never hold is
// ErrTooLarge (answered 413), not ErrUnavailable (503, retried for ever).
func TestReceiveTooLargeForStore(t *testing.T) {
	fs := &flakyStore{Store: store.NewMemory(store.MemoryOptions{}), err: fmt.Errorf("%w: over max_payload", store.ErrTooLarge)}
	fs.fail.Store(1)
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("t", "http://127.0.0.1:1/")}},
		Options{OpenStore: func() (store.Store, error) { return fs, nil }})
	_, err := e.Receive(t.Context(), []byte(v3Body("big")), "application/json")
	if !errors.Is(err, ErrTooLarge) || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "max_payload") {
		t.Fatalf("Receive of an event too large for the store: %v, want ErrTooLarge with the cause", err)
	}
}

// TestReceiveStoreFailureMarksNoKey: a failed durable write answers
// ErrUnavailable and does not mark the key, so that the sender's retry is
// stored rather than dropped as a duplicate.
func TestReceiveStoreFailureMarksNoKey(t *testing.T) {
	target := newTestTarget(t, nil)
	fs := &flakyStore{Store: store.NewMemory(store.MemoryOptions{})}
	fs.fail.Store(1)
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("t", target.URL)}},
		Options{OpenStore: func() (store.Store, error) { return fs, nil }})
	body := v3Body("a")
	_, err := e.Receive(t.Context(), []byte(body), "application/json")
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("Receive with a failing store: error %v, want ErrUnavailable with the cause", err)
	}
	if e.PendingEvents() != 0 {
		t.Errorf("PendingEvents = %d after a failed write, want 0", e.PendingEvents())
	}
	mustAccept(t, e, body)
	waitFor(t, "the delivery", 5*time.Second, func() bool { return target.count() == 1 })
}

func TestReceiveNoMatchingTarget(t *testing.T) {
	target := newTestTarget(t, nil)
	tc := fastTarget("verified-only", target.URL)
	tc.Match = []Match{{Path: "v2.verification_status", Values: []string{"verified"}}}
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v2InProgress)
	if e.PendingEvents() != 0 {
		t.Errorf("PendingEvents = %d for an event no target wants, want 0", e.PendingEvents())
	}
	mustDuplicate(t, e, v2InProgress)
	mustAccept(t, e, v2Verified)
	waitFor(t, "the matching delivery", 5*time.Second, func() bool { return target.count() == 1 })
	if got := string(target.requests()[0].Body); got != v2Verified {
		t.Errorf("target got %s, want only the verified event", got)
	}
}

func TestReceiveWhenFull(t *testing.T) {
	var up atomic.Bool
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		if !up.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	e := openEngine(t, Config{
		MaxPending: 2,
		Dedupe:     DedupeConfig{Capacity: 1}, // so that a duplicate must be found in the store
		Targets:    []TargetConfig{fastTarget("t", target.URL)},
	}, Options{OpenStore: memStore()})
	a, b, c := v3Body("a"), v3Body("b"), v3Body("c")
	mustAccept(t, e, a)
	mustAccept(t, e, b)
	if _, err := e.Receive(t.Context(), []byte(c), "application/json"); !errors.Is(err, ErrFull) {
		t.Fatalf("Receive past max_pending: error %v, want ErrFull", err)
	}
	mustDuplicate(t, e, b) // in the LRU
	mustDuplicate(t, e, a) // only in the store
	if _, err := e.Receive(t.Context(), []byte(c), "application/json"); !errors.Is(err, ErrFull) {
		t.Fatalf("Receive past max_pending: error %v, want ErrFull", err)
	}
	if got := e.PendingEvents(); got != 2 {
		t.Errorf("PendingEvents = %d, want 2", got)
	}
	up.Store(true)
	waitFor(t, "the queue to drain", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	mustAccept(t, e, c)
	if e.RetryAfter() != DefaultRetryAfter {
		t.Errorf("RetryAfter = %s, want the default %s", e.RetryAfter(), DefaultRetryAfter)
	}
}

// TestRestart: deliveries owed to a target that is down survive Close,
// and go out from the next engine on the same file, attempts counted on
// from where they were; re-sent events are still duplicates.
func TestRestart(t *testing.T) {
	path := tempBolt(t)
	down := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		w.WriteHeader(http.StatusBadGateway)
	})
	cfg := Config{Targets: []TargetConfig{fastTarget("legacy", down.URL)}}
	bodies := []string{v3Body("a"), v3Body("b"), v3Body("c")}

	e1, err := New(cfg, Options{OpenStore: boltStore(path)})
	if err != nil {
		t.Fatal(err)
	}
	if err := e1.Open(); err != nil {
		t.Fatal(err)
	}
	ids := map[store.ID]string{}
	for _, b := range bodies {
		ids[mustAccept(t, e1, b)] = b
	}
	// A second attempt at an event is made only once the first was
	// recorded; an attempt under way at Close is abandoned unrecorded.
	waitFor(t, "two failed attempts at every event", 10*time.Second, func() bool {
		seen := map[string]int{}
		for _, r := range down.requests() {
			seen[r.Header.Get(HeaderIdempotencyKey)]++
		}
		for id := range ids {
			if seen[id.String()] < 2 {
				return false
			}
		}
		return true
	})
	if err := e1.Close(); err != nil {
		t.Fatal(err)
	}

	// What the first engine recorded.
	st, err := store.OpenBolt(path, store.BoltOptions{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	attempts := map[store.ID]int{}
	err = st.Pending(func(d *store.Delivery) error {
		attempts[d.ID] = d.Attempts
		if d.LastStatus != http.StatusBadGateway {
			t.Errorf("pending %s: last status %d, want 502", d.ID, d.LastStatus)
		}
		return nil
	})
	if cerr := st.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(attempts) != len(bodies) {
		t.Fatalf("%d deliveries pending after Close, want %d", len(attempts), len(bodies))
	}
	for id, n := range attempts {
		if n < 1 {
			t.Errorf("event %s: %d attempts recorded", id, n)
		}
	}

	// The target is back (at another address, same name).
	upTarget := newTestTarget(t, nil)
	cfg.Targets[0].URL = upTarget.URL
	e2 := openEngine(t, cfg, Options{OpenStore: boltStore(path)})
	if got := targetStats(e2, "legacy").Pending; got != int64(len(bodies)) {
		t.Errorf("pending after restart = %d, want %d", got, len(bodies))
	}
	waitFor(t, "the owed deliveries", 10*time.Second, func() bool { return e2.PendingEvents() == 0 })
	reqs := upTarget.requests()
	if len(reqs) != len(bodies) {
		t.Fatalf("target got %d requests after restart, want %d", len(reqs), len(bodies))
	}
	for _, r := range reqs {
		id, err := store.ParseID(r.Header.Get(HeaderIdempotencyKey))
		if err != nil {
			t.Fatal(err)
		}
		if string(r.Body) != ids[id] {
			t.Errorf("event %s: body %s, want %s", id, r.Body, ids[id])
		}
		if got, want := r.Header.Get(HeaderAttempt), strconv.Itoa(attempts[id]+1); got != want {
			t.Errorf("event %s: attempt %s after restart, want %s (continuing the stored count)", id, got, want)
		}
	}
	for _, b := range bodies {
		mustDuplicate(t, e2, b)
	}
	if got := targetStats(e2, "legacy"); got.Pending != 0 || got.DeadLetters != 0 {
		t.Errorf("stats after delivery: %+v", got)
	}
}

// TestRestartWithoutTarget: deliveries pending at a target the new config
// lacks become dead letters at Open.
func TestRestartWithoutTarget(t *testing.T) {
	path := tempBolt(t)
	down := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	up := newTestTarget(t, nil)
	e1, err := New(Config{Targets: []TargetConfig{fastTarget("old", down.URL)}}, Options{OpenStore: boltStore(path)})
	if err != nil {
		t.Fatal(err)
	}
	if err := e1.Open(); err != nil {
		t.Fatal(err)
	}
	id := mustAccept(t, e1, v3Body("a"))
	waitFor(t, "an attempt", 5*time.Second, func() bool { return down.count() >= 1 })
	if err := e1.Close(); err != nil {
		t.Fatal(err)
	}
	e2 := openEngine(t, Config{Targets: []TargetConfig{fastTarget("new", up.URL)}}, Options{OpenStore: boltStore(path)})
	dl := deadLetters(t, e2)
	if len(dl) != 1 || dl[0].ID != id || dl[0].Target != "old" || dl[0].LastError != ReasonTargetRemoved {
		t.Fatalf("dead letters = %+v, want event %s at old with %q", dl, id, ReasonTargetRemoved)
	}
	if e2.PendingEvents() != 0 {
		t.Errorf("PendingEvents = %d, want 0", e2.PendingEvents())
	}
	if got := targetStats(e2, "old"); got.Configured || got.DeadLetters != 1 || got.Pending != 0 {
		t.Errorf("stats of the removed target: %+v", got)
	}
	mustDuplicate(t, e2, v3Body("a"))
}

// workers returns how many workers target name runs.
func workers(e *Engine, name string) int {
	e.mu.RLock()
	t := e.targets[name]
	e.mu.RUnlock()
	if t == nil {
		return 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.running
}

func TestUpdateTargetSettings(t *testing.T) {
	one := newTestTarget(t, nil)
	two := newTestTarget(t, nil)
	tc := fastTarget("legacy", one.URL)
	tc.Headers = http.Header{"X-Env": {"one"}}
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("a"))
	waitFor(t, "the first delivery", 5*time.Second, func() bool { return one.count() == 1 })

	tc.URL = two.URL
	tc.Headers = http.Header{"X-Env": {"two"}}
	if err := e.Update(Config{Targets: []TargetConfig{tc}}); err != nil {
		t.Fatal(err)
	}
	mustDuplicate(t, e, v3Body("a")) // the dedupe keys outlive the reload
	mustAccept(t, e, v3Body("b"))
	waitFor(t, "the delivery with new settings", 5*time.Second, func() bool { return two.count() == 1 })
	if got := two.requests()[0].Header.Get("X-Env"); got != "two" {
		t.Errorf("header after reload = %q, want two", got)
	}
	if one.count() != 1 {
		t.Errorf("old URL got %d requests, want 1", one.count())
	}
	if err := e.Update(Config{}); err == nil {
		t.Error("Update with no targets succeeded")
	}
	if got := e.Config().Targets[0].URL; got != two.URL {
		t.Errorf("a rejected Update changed the config: URL %s", got)
	}
}

func TestUpdateAddAndRemoveTargets(t *testing.T) {
	keep := newTestTarget(t, nil)
	var gone503 atomic.Int32
	gone := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		gone503.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	added := newTestTarget(t, nil)
	m := NewMetrics()
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("keep", keep.URL), fastTarget("gone", gone.URL)}},
		Options{OpenStore: memStore(), Metrics: m})
	ids := []store.ID{mustAccept(t, e, v3Body("a")), mustAccept(t, e, v3Body("b"))}
	waitFor(t, "deliveries to keep and failures at gone", 5*time.Second, func() bool {
		return targetStats(e, "keep").Pending == 0 && gone.count() >= 2
	})

	err := e.Update(Config{Targets: []TargetConfig{fastTarget("keep", keep.URL), fastTarget("added", added.URL)}})
	if err != nil {
		t.Fatal(err)
	}
	if got := targetStats(e, "gone"); got.Configured || got.Pending != 0 || got.DeadLetters != 2 {
		t.Errorf("stats of the removed target: %+v, want 2 dead letters, none pending", got)
	}
	if e.PendingEvents() != 0 {
		t.Errorf("PendingEvents = %d, want 0", e.PendingEvents())
	}
	dl := deadLetters(t, e)
	if len(dl) != 2 {
		t.Fatalf("%d dead letters, want 2", len(dl))
	}
	for _, d := range dl {
		if d.Target != "gone" || d.LastError != ReasonTargetRemoved || (d.ID != ids[0] && d.ID != ids[1]) {
			t.Errorf("dead letter %+v, want one of the events at gone with %q", d.Delivery, ReasonTargetRemoved)
		}
	}
	if workers(e, "gone") != 0 {
		t.Error("removed target still has workers")
	}
	stopped := gone.count()

	mustAccept(t, e, v3Body("c"))
	waitFor(t, "delivery to the kept and the added target", 5*time.Second, func() bool {
		return keep.count() == 3 && added.count() == 1
	})
	if got := string(added.requests()[0].Body); got != v3Body("c") {
		t.Errorf("added target got %s, want only the new event", got)
	}
	if got := added.requests()[0].Header.Get(HeaderTarget); got != "added" {
		t.Errorf("added target got %s %q", HeaderTarget, got)
	}
	if e.PendingEvents() != 0 {
		waitFor(t, "nothing pending", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	}
	// An attempt under way at removal may finish; nothing starts after.
	if n := gone.count(); n > stopped+2 {
		t.Errorf("removed target got %d more requests", n-stopped)
	}

	// Replay only works for configured targets: bring gone back first.
	if n, err := e.Replay(t.Context(), nil, ""); err != nil || n != 0 {
		t.Errorf("Replay to a removed target = %d, %v; want 0", n, err)
	}
	goneBack := newTestTarget(t, nil)
	err = e.Update(Config{Targets: []TargetConfig{fastTarget("keep", keep.URL), fastTarget("gone", goneBack.URL)}})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := e.Replay(t.Context(), nil, "gone"); err != nil || n != 2 {
		t.Fatalf("Replay = %d, %v; want 2", n, err)
	}
	waitFor(t, "replayed deliveries", 5*time.Second, func() bool { return goneBack.count() == 2 && e.PendingEvents() == 0 })
	for _, r := range goneBack.requests() {
		if got := r.Header.Get(HeaderAttempt); got != "1" {
			t.Errorf("replayed delivery attempt %s, want a fresh budget starting at 1", got)
		}
	}
	if got := targetStats(e, "gone"); !got.Configured || got.Pending != 0 || got.DeadLetters != 0 {
		t.Errorf("stats after replay: %+v", got)
	}
	if got := testutil.ToFloat64(m.Deliveries.WithLabelValues(DefaultName, "gone", "delivered")); got != 2 {
		t.Errorf("deliveries_total{gone,delivered} = %v, want 2", got)
	}
}

func TestUpdateConcurrency(t *testing.T) {
	// Re-armed for each batch, so not newHangingTarget.
	release := make(chan struct{})
	target := newTestTarget(t, func(w http.ResponseWriter, r *http.Request, _ int) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	tc := fastTarget("slow", target.URL)
	tc.Concurrency = 1
	e := openEngine(t, Config{Dedupe: DedupeConfig{Off: true}, Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})

	// batch sends n events while the target holds every request, waits
	// until want are in flight, then lets them all through.
	batch := func(n int, want int32) {
		t.Helper()
		release = make(chan struct{})
		target.maxIn.Store(0)
		for range n {
			mustAccept(t, e, v3Body("x"))
		}
		waitFor(t, fmt.Sprintf("%d requests in flight", want), 5*time.Second, func() bool { return target.inflight.Load() == want })
		close(release)
		waitFor(t, "the batch", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
		if got := target.maxIn.Load(); got != want {
			t.Errorf("at most %d requests in flight, want %d", got, want)
		}
	}
	batch(4, 1)
	for _, c := range []int{3, 1, 4, 2} {
		tc.Concurrency = c
		if err := e.Update(Config{Dedupe: DedupeConfig{Off: true}, Targets: []TargetConfig{tc}}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, fmt.Sprintf("%d workers", c), 5*time.Second, func() bool { return workers(e, "slow") == c })
		batch(3*c, int32(c))
	}
}

// TestUpdateConcurrencyWhileBusy lowers and raises a target's concurrency
// while its workers are in attempts: once they finish, the target runs
// exactly its concurrency, whichever workers were the busy ones.
func TestUpdateConcurrencyWhileBusy(t *testing.T) {
	releases := make(chan chan struct{}, 64)
	target := newTestTarget(t, func(w http.ResponseWriter, r *http.Request, _ int) {
		ch := make(chan struct{})
		releases <- ch
		select {
		case <-ch:
		case <-r.Context().Done():
		}
	})
	tc := fastTarget("slow", target.URL)
	tc.Concurrency = 4
	cfg := func(c int) Config {
		tc.Concurrency = c
		return Config{Dedupe: DedupeConfig{Off: true}, Targets: []TargetConfig{tc}}
	}
	e := openEngine(t, cfg(4), Options{OpenStore: memStore()})
	for range 4 {
		mustAccept(t, e, v3Body("x"))
	}
	waitFor(t, "4 requests in flight", 5*time.Second, func() bool { return target.inflight.Load() == 4 })
	if err := e.Update(cfg(1)); err != nil {
		t.Fatal(err)
	}
	// Let two of the four finish: surplus workers among them leave.
	close(<-releases)
	close(<-releases)
	waitFor(t, "two requests done", 5*time.Second, func() bool { return target.inflight.Load() == 2 })
	if err := e.Update(cfg(4)); err != nil {
		t.Fatal(err)
	}
	close(<-releases)
	close(<-releases)
	waitFor(t, "all done", 5*time.Second, func() bool { return e.PendingEvents() == 0 && target.inflight.Load() == 0 })
	if err := e.Update(cfg(2)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "2 workers", 5*time.Second, func() bool { return workers(e, "slow") == 2 })
	target.maxIn.Store(0)
	for range 6 {
		mustAccept(t, e, v3Body("x"))
	}
	waitFor(t, "2 requests in flight", 5*time.Second, func() bool { return target.inflight.Load() == 2 })
	for range 6 {
		close(<-releases)
	}
	waitFor(t, "the batch", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	if got := target.maxIn.Load(); got != 2 {
		t.Errorf("at most %d requests in flight, want 2", got)
	}
}

func TestDeadLetterReplayAndDelete(t *testing.T) {
	var accept atomic.Bool
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		if !accept.Load() {
			http.Error(w, "missing field: location_id", http.StatusUnprocessableEntity)
		}
	})
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("t", target.URL)}}, Options{OpenStore: memStore()})
	a, b := mustAccept(t, e, v3Body("a")), mustAccept(t, e, v3Body("b"))
	waitFor(t, "two dead letters", 5*time.Second, func() bool { return targetStats(e, "t").DeadLetters == 2 })
	dl := deadLetters(t, e)
	if len(dl) != 2 {
		t.Fatalf("%d dead letters, want 2", len(dl))
	}
	for _, d := range dl {
		if d.LastStatus != 422 || !strings.Contains(d.LastError, "missing field: location_id") || d.Attempts != 1 {
			t.Errorf("dead letter %+v, want the 422 and its message after 1 attempt", d.Delivery)
		}
	}
	accept.Store(true)
	if n, err := e.Replay(t.Context(), []store.ID{a}, ""); err != nil || n != 1 {
		t.Fatalf("Replay(a) = %d, %v; want 1", n, err)
	}
	waitFor(t, "the replayed delivery", 5*time.Second, func() bool { return target.count() == 3 && e.PendingEvents() == 0 })
	if n, err := e.DeleteDead(t.Context(), b, "other"); err != nil || n != 0 {
		t.Errorf("DeleteDead(b, other target) = %d, %v; want 0", n, err)
	}
	if n, err := e.DeleteDead(t.Context(), b, ""); err != nil || n != 1 {
		t.Errorf("DeleteDead(b) = %d, %v; want 1", n, err)
	}
	if got := targetStats(e, "t"); got.DeadLetters != 0 || got.Pending != 0 {
		t.Errorf("stats: %+v", got)
	}
	if dl := deadLetters(t, e); len(dl) != 0 {
		t.Errorf("dead letters left: %+v", dl)
	}
	// Both keys remain: the events are duplicates still.
	mustDuplicate(t, e, v3Body("a"))
	mustDuplicate(t, e, v3Body("b"))
}

// gather returns the value of every sample of the named family, by its
// labels (other than relay) joined with commas.
func gather(t *testing.T, reg *prometheus.Registry, name string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				if l.GetName() != "relay" {
					labels = append(labels, l.GetValue())
				}
			}
			v := -1.0
			switch {
			case m.GetGauge() != nil:
				v = m.GetGauge().GetValue()
			case m.GetCounter() != nil:
				v = m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				v = float64(m.GetHistogram().GetSampleCount())
			}
			out[strings.Join(labels, ",")] = v
		}
	}
	return out
}

func TestMetrics(t *testing.T) {
	ok := newTestTarget(t, nil)
	down := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	bad := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		w.WriteHeader(http.StatusBadRequest)
	})
	clock := newFakeClock()
	m := NewMetrics()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m.Collectors()...)
	if err := m.Register(reg); err != nil {
		t.Errorf("registering again: %v, want AlreadyRegistered ignored", err)
	}
	slow := fastTarget("down", down.URL)
	slow.BackoffMin, slow.BackoffMax = time.Hour, 2*time.Hour // no second attempt in this test
	e := openEngine(t, Config{
		Name:    "edge",
		Targets: []TargetConfig{fastTarget("ok", ok.URL), slow, fastTarget("bad", bad.URL)},
	}, Options{OpenStore: memStore(clock.Now), Metrics: m, Now: clock.Now})

	for _, b := range []string{v3Body("a"), v3Body("b")} {
		mustAccept(t, e, b)
		e.Observe(ResultAccepted, time.Millisecond)
	}
	mustDuplicate(t, e, v3Body("a"))
	e.Observe(ResultDuplicate, time.Millisecond)
	e.Observe(ResultUnauthorized, 0)
	waitFor(t, "every first attempt settled", 5*time.Second, func() bool {
		return testutil.ToFloat64(m.Deliveries.WithLabelValues("edge", "ok", "delivered")) == 2 &&
			testutil.ToFloat64(m.Deliveries.WithLabelValues("edge", "bad", "dead_lettered")) == 2 &&
			testutil.ToFloat64(m.Deliveries.WithLabelValues("edge", "down", "retried")) == 2
	})
	clock.Advance(90 * time.Second)

	counters := []struct {
		c    prometheus.Collector
		want float64
	}{
		{m.Received.WithLabelValues("edge", ResultAccepted), 2},
		{m.Received.WithLabelValues("edge", ResultDuplicate), 1},
		{m.Received.WithLabelValues("edge", ResultUnauthorized), 1},
		{m.Received.WithLabelValues("edge", ResultUnavailable), 0},
		{m.Deliveries.WithLabelValues("edge", "ok", "retried"), 0},
		{m.Deliveries.WithLabelValues("edge", "down", "dead_lettered"), 0},
		{m.DedupeEvictions.WithLabelValues("edge"), 0},
	}
	for i, c := range counters {
		if got := testutil.ToFloat64(c.c); got != c.want {
			t.Errorf("counter %d: %v, want %v", i, got, c.want)
		}
	}
	for _, g := range []struct {
		name string
		want map[string]float64
	}{
		{"caddy_webhook_relay_pending", map[string]float64{"ok": 0, "down": 2, "bad": 0}},
		{"caddy_webhook_relay_dead_letters", map[string]float64{"ok": 0, "down": 0, "bad": 2}},
		{"caddy_webhook_relay_oldest_pending_seconds", map[string]float64{"ok": 0, "down": 90, "bad": 0}},
		{"caddy_webhook_relay_target_held", map[string]float64{"ok": 0, "down": 0, "bad": 0}},
		{"caddy_webhook_relay_dedupe_entries", map[string]float64{"": 2}},
		{"caddy_webhook_relay_received_total", map[string]float64{
			"accepted": 2, "duplicate": 1, "unauthorized": 1, "invalid": 0, "too_large": 0, "unavailable": 0,
		}},
		{"caddy_webhook_relay_delivery_latency_seconds", map[string]float64{"ok": 2, "down": 0, "bad": 0}},
		{"caddy_webhook_relay_delivery_attempt_duration_seconds", map[string]float64{"ok": 2, "down": 2, "bad": 2}},
		// 401 is a rejection, not an ack: 2 accepted + 1 duplicate.
		{"caddy_webhook_relay_ack_duration_seconds", map[string]float64{"": 3}},
	} {
		if got := gather(t, reg, g.name); fmt.Sprint(got) != fmt.Sprint(g.want) {
			t.Errorf("%s = %v, want %v", g.name, got, g.want)
		}
	}

	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if got := gather(t, reg, "caddy_webhook_relay_pending"); len(got) != 0 {
		t.Errorf("a closed engine still reports pending: %v", got)
	}
	if got := testutil.ToFloat64(m.Received.WithLabelValues("edge", ResultAccepted)); got != 2 {
		t.Errorf("counters lost at Close: accepted = %v", got)
	}
}

// TestCloseAbandonsAttemptUnderWay: Close does not wait for a hanging
// target; the attempt it cut short is not counted, and the next engine
// sends the event again.
func TestCloseAbandonsAttemptUnderWay(t *testing.T) {
	path := tempBolt(t)
	hang := newTestTarget(t, func(w http.ResponseWriter, r *http.Request, _ int) { <-r.Context().Done() })
	tc := fastTarget("legacy", hang.URL)
	tc.Timeout = time.Hour
	e1, err := New(Config{Targets: []TargetConfig{tc}}, Options{OpenStore: boltStore(path)})
	if err != nil {
		t.Fatal(err)
	}
	if err := e1.Open(); err != nil {
		t.Fatal(err)
	}
	id := mustAccept(t, e1, v3Body("a"))
	waitFor(t, "the attempt to hang", 5*time.Second, func() bool { return hang.inflight.Load() == 1 })
	start := time.Now()
	if err := e1.Close(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Close took %s with an attempt hanging", took)
	}

	up := newTestTarget(t, nil)
	tc.URL = up.URL
	e2 := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: boltStore(path)})
	waitFor(t, "the delivery after restart", 5*time.Second, func() bool { return e2.PendingEvents() == 0 })
	reqs := up.requests()
	if len(reqs) != 1 || reqs[0].Header.Get(HeaderIdempotencyKey) != id.String() || reqs[0].Header.Get(HeaderAttempt) != "1" {
		t.Errorf("after restart: %d requests, first %v; want event %s as attempt 1 again", len(reqs), reqs, id)
	}
}

// TestRemovedTargetStopsAtOnce: a target removed by a reload gets no
// further attempts, however many of its deliveries were due; nor does a
// closing engine go through its backlog.
func TestRemovedTargetStopsAtOnce(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	target := newTestTarget(t, func(w http.ResponseWriter, r *http.Request, n int) {
		if n == 0 {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	tc := fastTarget("gone", target.URL)
	tc.Concurrency = 1
	keep := fastTarget("kept", target.URL)
	keep.Match = []Match{{Path: "nothing", Values: []string{"matches"}}}
	e := openEngine(t, Config{Targets: []TargetConfig{tc, keep}}, Options{OpenStore: memStore()})
	for i := range 200 {
		mustAccept(t, e, v3Body(fmt.Sprintf("due-%d", i)))
	}
	waitFor(t, "the first attempt to be held", 5*time.Second, func() bool { return target.count() == 1 })
	e.mu.RLock()
	gone := e.targets["gone"]
	e.mu.RUnlock()
	if err := e.Update(Config{Targets: []TargetConfig{keep}}); err != nil {
		t.Fatal(err)
	}
	once.Do(func() { close(release) })
	waitFor(t, "the removed target's worker to leave", 5*time.Second, func() bool {
		gone.mu.Lock()
		defer gone.mu.Unlock()
		return gone.running == 0
	})
	if got := target.count(); got != 1 {
		t.Errorf("the removed target got %d requests, want only the one under way at the removal", got)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if got := target.count(); got != 1 {
		t.Errorf("the removed target got %d requests, want only the one under way at the removal", got)
	}
}
