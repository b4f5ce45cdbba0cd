package natsstore_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store/natsstore"
)

// Two engines of one relay, each with a store of its own on one server:
// what the contract's "Several machines" promises, end to end.

const headerInstance = "X-Instance"

// hookReq is what a test target saw of one request.
type hookReq struct {
	key, instance string
	body, sig     string
	arrived       time.Time
	status        int // what it answered; 0 while the request is under way
}

// hook is an HTTP target on 127.0.0.1 that records every request and
// answers what answer says (200 when nil); answer may block.
type hook struct {
	*httptest.Server
	answer func(r *http.Request) int

	mu   sync.Mutex
	reqs []hookReq
}

func newHook(t testing.TB, answer func(r *http.Request) int) *hook {
	t.Helper()
	h := &hook{answer: answer}
	h.Server = httptest.NewServer(http.HandlerFunc(h.serve))
	t.Cleanup(h.Close)
	return h
}

func (h *hook) serve(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	h.mu.Lock()
	n := len(h.reqs)
	h.reqs = append(h.reqs, hookReq{
		key: r.Header.Get(relay.HeaderIdempotencyKey), instance: r.Header.Get(headerInstance), arrived: time.Now(),
		body: string(b), sig: r.Header.Get("Webhook-Signature"),
	})
	h.mu.Unlock()
	code := http.StatusOK
	if h.answer != nil {
		code = h.answer(r)
	}
	h.mu.Lock()
	h.reqs[n].status = code
	h.mu.Unlock()
	w.WriteHeader(code)
}

func (h *hook) requests() []hookReq {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.reqs)
}

// delivered counts the 200 answers per Idempotency-Key.
func (h *hook) delivered() map[string]int {
	out := map[string]int{}
	for _, r := range h.requests() {
		if r.status == http.StatusOK {
			out[r.key]++
		}
	}
	return out
}

func waitFor(t testing.TB, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func storeConfig(url string) natsstore.Config {
	return natsstore.Config{
		URLs:           []string{url},
		Stream:         "RELAY_ENGINES",
		Name:           "engines",
		Timeout:        2 * time.Second,
		ConnectTimeout: 2 * time.Second,
	}
}

// target is a target config with short retry delays.
func target(name, url string) relay.TargetConfig {
	return relay.TargetConfig{
		Name:        name,
		URL:         url,
		Timeout:     5 * time.Second,
		BackoffMin:  20 * time.Millisecond,
		BackoffMax:  200 * time.Millisecond,
		MaxAttempts: 100,
		Concurrency: 2,
	}
}

// relayConfig is one instance's config: every target forwards a header
// naming the instance (a setting instances may differ in).
func relayConfig(instance string, targets ...relay.TargetConfig) relay.Config {
	cfg := relay.Config{Name: "engines"}
	for _, tc := range targets {
		tc.Headers = http.Header{headerInstance: {instance}}
		cfg.Targets = append(cfg.Targets, tc)
	}
	return cfg
}

// openEngine opens an engine on a store of its own and waits until the
// store is up; the test's cleanup closes it.
func openEngine(t testing.TB, cfg relay.Config, scfg natsstore.Config) *relay.Engine {
	t.Helper()
	e, err := relay.New(cfg, relay.Options{OpenStore: func() (store.Store, error) {
		s, err := natsstore.Open(scfg)
		if err != nil {
			return nil, err
		}
		return s, nil
	}})
	if err != nil {
		t.Fatalf("relay.New: %v", err)
	}
	if err := e.Open(); err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	<-e.Loaded()
	waitStoreUp(t, e)
	return e
}

func waitStoreUp(t testing.TB, e *relay.Engine) {
	t.Helper()
	waitFor(t, "the store up", 15*time.Second, func() bool { up, _ := e.StoreUp(); return up })
}

func body(id string) []byte {
	return []byte(`{"event_type":"address_verification.completed","event_id":"` + id + `","api_version":"v3","data":{"status":"verified"}}`)
}

func receive(t testing.TB, e *relay.Engine, b []byte) relay.Result {
	t.Helper()
	res, err := e.Receive(t.Context(), b, "application/json")
	if err != nil {
		t.Fatalf("Receive(%s): %v", b, err)
	}
	return res
}

func allDead(t testing.TB, e *relay.Engine) []store.DeadLetter {
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

func pendingEvents(e *relay.Engine) int64 {
	ov := e.Overview(context.Background())
	if !ov.StoreUp || ov.StoreError != "" {
		return -1
	}
	return ov.PendingEvents
}

// TestEnginesSameEventAtOnce: one event received by both instances at
// once is stored once and delivered once: one answer accepted, the other
// duplicate with the same event id.
func TestEnginesSameEventAtOnce(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	h := newHook(t, nil)
	a := openEngine(t, relayConfig("a", target("t", h.URL)), storeConfig(ns.URL()))
	b := openEngine(t, relayConfig("b", target("t", h.URL)), storeConfig(ns.URL()))

	const rounds = 20
	ids := map[string]bool{}
	for round := range rounds {
		ev := body("same-" + strconv.Itoa(round))
		var res [2]relay.Result
		var errs [2]error
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, e := range []*relay.Engine{a, b} {
			wg.Go(func() {
				<-start
				res[i], errs[i] = e.Receive(t.Context(), ev, "application/json")
			})
		}
		close(start)
		wg.Wait()
		if err := errors.Join(errs[:]...); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if res[0].EventID != res[1].EventID {
			t.Fatalf("round %d: event ids %s and %s", round, res[0].EventID, res[1].EventID)
		}
		if res[0].Duplicate == res[1].Duplicate {
			t.Fatalf("round %d: duplicate %v and %v, want one accepted and one duplicate", round, res[0].Duplicate, res[1].Duplicate)
		}
		ids[res[0].EventID.String()] = true
	}
	// Once nothing is pending, nothing more can come.
	waitFor(t, "every event delivered", 30*time.Second, func() bool {
		return len(h.delivered()) == rounds && pendingEvents(a) == 0 && pendingEvents(b) == 0
	})
	seen := map[string]int{}
	for _, r := range h.requests() {
		seen[r.key]++
	}
	for id := range ids {
		if seen[id] != 1 {
			t.Errorf("event %s sent to the target %d times, want once", id, seen[id])
		}
	}
}

// TestEnginesDedupeAfterRestart: an event delivered through one instance
// and sent to the other after a NATS restart, past a one-second message-id
// window, is a duplicate and is not delivered again.
func TestEnginesDedupeAfterRestart(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	natsstore.CreateStream(t, ns.URL(), storeConfig(ns.URL()).Stream, time.Second)
	h := newHook(t, nil)
	a := openEngine(t, relayConfig("a", target("t", h.URL)), storeConfig(ns.URL()))
	b := openEngine(t, relayConfig("b", target("t", h.URL)), storeConfig(ns.URL()))

	ev := body("restart-1")
	first := receive(t, a, ev)
	if first.Duplicate {
		t.Fatal("first Receive: duplicate, want accepted")
	}
	key := first.EventID.String()
	waitFor(t, "the event delivered", 15*time.Second, func() bool { return h.delivered()[key] == 1 && pendingEvents(a) == 0 })

	ns.Stop()
	ns.Start()
	waitStoreUp(t, a)
	waitStoreUp(t, b)
	// Past the window: the stream's message ids cannot tell any more.
	// (Time passing is the condition.)
	time.Sleep(2 * time.Second)
	again := receive(t, b, ev)
	if !again.Duplicate || again.EventID != first.EventID {
		t.Fatalf("Receive at the other instance after the restart = %+v, want duplicate %s", again, first.EventID)
	}
	if p := pendingEvents(b); p != 0 {
		t.Errorf("pending events after the duplicate = %d, want 0", p)
	}
	if n := len(h.requests()); n != 1 {
		t.Errorf("the target got %d requests, want 1", n)
	}
}

// TestEnginesDeadLettersAcross: dead letters made by one instance are
// listed and replayed through the other, then delivered.
func TestEnginesDeadLettersAcross(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	var accept atomic.Bool
	h := newHook(t, func(*http.Request) int {
		if accept.Load() {
			return http.StatusOK
		}
		return http.StatusBadRequest
	})
	a := openEngine(t, relayConfig("a", target("t", h.URL)), storeConfig(ns.URL()))
	const n = 3
	want := map[store.ID]bool{}
	for i := range n {
		res := receive(t, a, body("dead-"+strconv.Itoa(i)))
		want[res.EventID] = true
	}
	waitFor(t, "dead letters at the first instance", 15*time.Second, func() bool { return len(allDead(t, a)) == n })

	b := openEngine(t, relayConfig("b", target("t", h.URL)), storeConfig(ns.URL()))
	list := allDead(t, b)
	if len(list) != n {
		t.Fatalf("the other instance lists %d dead letters, want %d", len(list), n)
	}
	for _, dl := range list {
		if !want[dl.ID] || dl.Target != "t" || dl.LastStatus != http.StatusBadRequest || dl.Attempts != 1 {
			t.Errorf("dead letter %s at %s: status %d after %d attempts; want one of the events at t, 400 after 1", dl.ID, dl.Target, dl.LastStatus, dl.Attempts)
		}
	}
	accept.Store(true)
	moved, err := b.Replay(t.Context(), nil, "")
	if err != nil || moved != n {
		t.Fatalf("Replay through the other instance = %d, %v; want %d", moved, err, n)
	}
	waitFor(t, "the replayed events delivered", 15*time.Second, func() bool { return len(h.delivered()) == n })
	for id := range want {
		if got := h.delivered()[id.String()]; got != 1 {
			t.Errorf("event %s delivered %d times after the replay, want 1", id, got)
		}
	}
	waitFor(t, "no dead letters and nothing pending", 10*time.Second, func() bool {
		return len(allDead(t, a)) == 0 && len(allDead(t, b)) == 0 && pendingEvents(a) == 0 && pendingEvents(b) == 0
	})
}

// TestEngineTakeover: an instance closed in the middle of an attempt
// leaves the delivery to another instance within the attempt's timeout
// plus 10 s.
func TestEngineTakeover(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	// The first instance's attempts hang (until abandoned); the other's
	// are answered.
	h := newHook(t, func(r *http.Request) int {
		if r.Header.Get(headerInstance) == "a" {
			<-r.Context().Done()
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	})
	tc := target("t", h.URL)
	tc.Timeout = time.Second // the lease: 1 s + 5 s
	a := openEngine(t, relayConfig("a", tc), storeConfig(ns.URL()))
	res := receive(t, a, body("takeover-1"))
	waitFor(t, "the first attempt under way", 10*time.Second, func() bool { return len(h.requests()) > 0 })

	closing := time.Now()
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	b := openEngine(t, relayConfig("b", tc), storeConfig(ns.URL()))
	limit := tc.Timeout + 10*time.Second
	waitFor(t, "the other instance delivering", limit+5*time.Second, func() bool { return h.delivered()[res.EventID.String()] == 1 })
	took := time.Since(closing)
	t.Logf("delivery taken over %s after the first instance closed (lease %s)", took.Round(time.Millisecond), tc.Timeout+5*time.Second)
	if took > limit {
		t.Errorf("taken over after %s, want within the timeout plus 10s (%s)", took, limit)
	}
	for _, r := range h.requests() {
		if r.status == http.StatusOK && r.instance != "b" {
			t.Errorf("delivered by %q, want b", r.instance)
		}
	}
	waitFor(t, "nothing pending", 10*time.Second, func() bool { return pendingEvents(b) == 0 })
}

// TestEnginesNATSRestartUnderLoad: NATS restarts from its files while
// events flow into both instances. Every acknowledged event is delivered
// at least once, and intake succeeds again within 10 s of NATS being back.
func TestEnginesNATSRestartUnderLoad(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	h := newHook(t, nil)
	engines := []*relay.Engine{
		openEngine(t, relayConfig("a", target("t", h.URL)), storeConfig(ns.URL())),
		openEngine(t, relayConfig("b", target("t", h.URL)), storeConfig(ns.URL())),
	}

	type writer struct {
		mu      sync.Mutex
		acked   map[string]bool // accepted or duplicate: stored
		dups    int
		failed  int
		lastOK  time.Time
		okAfter []time.Time // the end of each success, for the time back
		wrong   []error
	}
	ws := []*writer{{acked: map[string]bool{}}, {acked: map[string]bool{}}}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	for i, e := range engines {
		w := ws[i]
		wg.Go(func() {
			for n := 0; ctx.Err() == nil; n++ {
				b := body(fmt.Sprintf("load-%d-%d", i, n))
				// A sender retries an event until it is acknowledged.
				for ctx.Err() == nil {
					rctx, rcancel := context.WithTimeout(context.Background(), 3*time.Second)
					res, err := e.Receive(rctx, b, "application/json")
					rcancel()
					w.mu.Lock()
					if err != nil {
						w.failed++
						if !errors.Is(err, relay.ErrUnavailable) {
							w.wrong = append(w.wrong, err)
						}
					} else {
						w.acked[res.EventID.String()] = true
						if res.Duplicate {
							w.dups++
						}
						w.lastOK = time.Now()
						w.okAfter = append(w.okAfter, w.lastOK)
					}
					w.mu.Unlock()
					if err == nil {
						break
					}
					time.Sleep(50 * time.Millisecond) // the sender's Retry-After, shortened
				}
			}
		})
	}
	acked := func() int {
		n := 0
		for _, w := range ws {
			w.mu.Lock()
			n += len(w.acked)
			w.mu.Unlock()
		}
		return n
	}
	waitFor(t, "events flowing", 15*time.Second, func() bool { return acked() >= 40 })
	ns.Stop()
	for _, e := range engines {
		waitFor(t, "the store down", 15*time.Second, func() bool { up, _ := e.StoreUp(); return !up })
	}
	ns.Start()
	back := time.Now()
	firstOK := func(w *writer) time.Duration {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, at := range w.okAfter {
			if at.After(back) {
				return at.Sub(back)
			}
		}
		return -1
	}
	waitFor(t, "intake back at both instances", 30*time.Second, func() bool {
		for _, w := range ws {
			if d := firstOK(w); d < 0 || time.Since(back) < d+2*time.Second {
				return false // not back, or not for two seconds yet
			}
		}
		return true
	})
	cancel()
	wg.Wait()
	want := map[string]bool{}
	failed, dups := 0, 0
	for i, w := range ws {
		d := firstOK(w)
		t.Logf("instance %d: intake back %s after NATS", i, d.Round(time.Millisecond))
		if d > 10*time.Second {
			t.Errorf("instance %d: intake back %s after NATS, want within 10s", i, d)
		}
		for _, err := range w.wrong {
			t.Errorf("instance %d: Receive: %v; want ErrUnavailable", i, err)
		}
		for id := range w.acked {
			want[id] = true
		}
		failed += w.failed
		dups += w.dups
	}
	waitFor(t, "every acknowledged event delivered", 60*time.Second, func() bool {
		got := h.delivered()
		for id := range want {
			if got[id] == 0 {
				return false
			}
		}
		return true
	})
	twice := 0
	for _, n := range h.delivered() {
		if n > 1 {
			twice++
		}
	}
	t.Logf("%d events acknowledged (%d of them as duplicates of a retried send), %d Receives failed, 0 lost, %d delivered more than once", len(want), dups, failed, twice)
}

// TestEnginesRemoveTarget: a target removed from one instance's config
// dead-letters nothing; the instance that still has it delivers.
func TestEnginesRemoveTarget(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	keep := newHook(t, nil)
	var open atomic.Bool
	gone := newHook(t, func(*http.Request) int {
		if open.Load() {
			return http.StatusOK
		}
		return http.StatusServiceUnavailable
	})
	targets := []relay.TargetConfig{target("keep", keep.URL), target("gone", gone.URL)}
	a := openEngine(t, relayConfig("a", targets...), storeConfig(ns.URL()))
	b := openEngine(t, relayConfig("b", targets...), storeConfig(ns.URL()))
	const n = 10
	for i := range n {
		receive(t, a, body("remove-"+strconv.Itoa(i)))
	}
	waitFor(t, "every event at keep, and tried at gone", 15*time.Second, func() bool {
		return len(keep.delivered()) == n && len(gone.requests()) >= n
	})
	if err := a.Update(relayConfig("a", targets[0])); err != nil {
		t.Fatalf("Update: %v", err)
	}
	updated := time.Now()
	if d := len(allDead(t, a)); d != 0 {
		t.Fatalf("%d dead letters after the target left one instance, want 0", d)
	}
	// The instance without it shows its deliveries, as not configured.
	waitFor(t, "gone shown as pending and not configured", 10*time.Second, func() bool {
		for _, ts := range a.Overview(t.Context()).Targets {
			if ts.Name == "gone" {
				return !ts.Configured && ts.Pending == n
			}
		}
		return false
	})
	open.Store(true)
	opened := time.Now()
	waitFor(t, "gone's deliveries made by the other instance", 30*time.Second, func() bool { return len(gone.delivered()) == n })
	// Within its retry delays, not a lease: nothing the instance without
	// the target had fetched waits out its lease.
	took := time.Since(opened)
	t.Logf("gone's %d deliveries made %s after it answered again", n, took.Round(time.Millisecond))
	if lease := targets[1].Timeout + 5*time.Second; took >= lease/2 {
		t.Errorf("gone's deliveries made %s after it answered again, want well within a lease (%s)", took, lease)
	}
	late := 0
	for _, r := range gone.requests() {
		if r.instance == "a" && r.arrived.After(updated) {
			late++
		}
	}
	// An attempt already under way when the target left may still land.
	if late > targets[1].Concurrency {
		t.Errorf("%d requests to gone from the instance without it after the update, want at most %d", late, targets[1].Concurrency)
	}
	waitFor(t, "nothing pending", 10*time.Second, func() bool { return pendingEvents(a) == 0 && pendingEvents(b) == 0 })
	if d := len(allDead(t, b)); d != 0 {
		t.Errorf("%d dead letters, want 0", d)
	}
}

// TestEnginesOverviewAgree: both instances show the relay's counts, the
// same pending and dead-letter numbers whichever instance received or
// failed the events.
func TestEnginesOverviewAgree(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	ok := newHook(t, nil)
	bad := newHook(t, func(*http.Request) int { return http.StatusBadRequest })
	held := newHook(t, func(*http.Request) int { return http.StatusServiceUnavailable })
	slow := target("held", held.URL)
	slow.BackoffMin, slow.BackoffMax = time.Hour, time.Hour // one attempt, then pending for the test's life
	targets := []relay.TargetConfig{target("ok", ok.URL), target("bad", bad.URL), slow}
	engines := []*relay.Engine{
		openEngine(t, relayConfig("a", targets...), storeConfig(ns.URL())),
		openEngine(t, relayConfig("b", targets...), storeConfig(ns.URL())),
	}
	const n = 6
	for i := range n {
		receive(t, engines[i%2], body("overview-"+strconv.Itoa(i)))
	}
	// The counts of each target: pending, dead.
	type counts struct {
		events            int64
		held, heldDead    int64
		badPending, bad   int64
		okPending, okDead int64
		oldest            float64
	}
	read := func(e *relay.Engine) counts {
		ov := e.Overview(t.Context())
		c := counts{events: ov.PendingEvents}
		for _, ts := range ov.Targets {
			switch ts.Name {
			case "held":
				c.held, c.heldDead, c.oldest = ts.Pending, ts.DeadLetters, ts.OldestPendingSeconds
			case "bad":
				c.badPending, c.bad = ts.Pending, ts.DeadLetters
			case "ok":
				c.okPending, c.okDead = ts.Pending, ts.DeadLetters
			}
		}
		return c
	}
	done := func(c counts) bool {
		return c == counts{events: n, held: n, bad: n, oldest: c.oldest}
	}
	var ca, cb counts
	waitFor(t, "both instances showing every event", 20*time.Second, func() bool {
		ca, cb = read(engines[0]), read(engines[1])
		return done(ca) && done(cb) && len(held.requests()) == n
	})
	ca.oldest, cb.oldest = math.Round(ca.oldest), math.Round(cb.oldest)
	if math.Abs(ca.oldest-cb.oldest) > 1 {
		t.Errorf("oldest pending %v s and %v s", ca.oldest, cb.oldest)
	}
	ca.oldest, cb.oldest = 0, 0
	if ca != cb {
		t.Errorf("overviews differ: %+v and %+v", ca, cb)
	}
	oa, ob := engines[0].Overview(t.Context()), engines[1].Overview(t.Context())
	if len(oa.Targets) != len(ob.Targets) {
		t.Fatalf("target stats differ: %+v and %+v", oa.Targets, ob.Targets)
	}
	for i := range oa.Targets {
		x, y := oa.Targets[i], ob.Targets[i]
		x.OldestPendingSeconds, y.OldestPendingSeconds = 0, 0
		if x != y {
			t.Errorf("target stats differ: %+v and %+v", x, y)
		}
	}
	t.Logf("both show %d events pending, %d pending at held, %d dead at bad", ca.events, ca.held, ca.bad)
}
