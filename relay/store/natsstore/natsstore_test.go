package natsstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	natsserver "github.com/nats-io/nats-server/v2/test"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store/storetest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// natsServer is an embedded JetStream server that a test can restart on
// its files and port.
type natsServer struct {
	t    testing.TB
	dir  string
	port int
	// configure, if set, changes the options before each start (auth,
	// TLS).
	configure func(*server.Options)
	mu        sync.Mutex
	s         *server.Server
}

func startNATS(t testing.TB) *natsServer {
	t.Helper()
	ns := &natsServer{t: t, dir: t.TempDir(), port: -1}
	ns.start()
	t.Cleanup(ns.stop)
	return ns
}

// startNATSWith starts a server whose options configure changes.
func startNATSWith(t testing.TB, configure func(*server.Options)) *natsServer {
	t.Helper()
	ns := &natsServer{t: t, dir: t.TempDir(), port: -1, configure: configure}
	ns.start()
	t.Cleanup(ns.stop)
	return ns
}

// startNATSAt starts a server on a port picked before, for a store that
// was opened while nothing listened there.
func startNATSAt(t testing.TB, port int) *natsServer {
	t.Helper()
	ns := &natsServer{t: t, dir: t.TempDir(), port: port}
	ns.start()
	t.Cleanup(ns.stop)
	return ns
}

func (ns *natsServer) start() {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	opts := natsserver.DefaultTestOptions
	opts.Port = ns.port
	opts.JetStream = true
	opts.StoreDir = ns.dir
	if ns.configure != nil {
		ns.configure(&opts)
	}
	ns.s = natsserver.RunServer(&opts)
	ns.port = ns.s.Addr().(*net.TCPAddr).Port
}

func (ns *natsServer) stop() {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	if ns.s != nil {
		ns.s.Shutdown()
		ns.s.WaitForShutdown()
		ns.s = nil
	}
}

func (ns *natsServer) restart() {
	ns.stop()
	ns.start()
}

func (ns *natsServer) url() string { return "nats://127.0.0.1:" + strconv.Itoa(ns.port) }

func testConfig(url string, now func() time.Time) Config {
	return Config{URLs: []string{url}, Stream: "RELAY_TEST", Name: "test", Timeout: 2 * time.Second, ConnectTimeout: 2 * time.Second, Now: now}
}

func openStore(t testing.TB, cfg Config) *Store {
	t.Helper()
	s, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

// openUp opens a store and waits for it to be up.
func openUp(t testing.TB, cfg Config) *Store {
	t.Helper()
	s := openStore(t, cfg)
	waitUp(t, s)
	return s
}

func waitUp(t testing.TB, s *Store) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		up, err := s.Up()
		if up {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("store not up after 10s: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func harness() storetest.Harness {
	var mu sync.Mutex
	servers := map[store.Store]*natsServer{}
	return storetest.Harness{
		Open: func(t testing.TB, now func() time.Time) store.Store {
			t.Helper()
			ns := startNATS(t)
			s := openUp(t, testConfig(ns.url(), now))
			mu.Lock()
			servers[s] = ns
			mu.Unlock()
			return s
		},
		Reopen: func(t testing.TB, s store.Store, now func() time.Time) store.Store {
			t.Helper()
			mu.Lock()
			ns := servers[s]
			delete(servers, s)
			mu.Unlock()
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			ns.restart()
			s = openUp(t, testConfig(ns.url(), now))
			mu.Lock()
			servers[s] = ns
			mu.Unlock()
			return s
		},
		Shared:    true,
		RealClock: true,
	}
}

func TestContract(t *testing.T) {
	storetest.Run(t, harness())
}

var ctxBG = context.Background()

func ev(n int, at time.Time) *store.Event {
	var id store.ID
	copy(id[:], "nats-"+strconv.Itoa(n))
	return &store.Event{ID: id, ReceivedAt: at, ContentType: "application/json", Body: []byte(`{"n":` + strconv.Itoa(n) + `}`)}
}

func dayKey(e *store.Event) store.AcceptOptions {
	return store.AcceptOptions{KeyExpiry: e.ReceivedAt.Add(24 * time.Hour)}
}

func mustAccept(t *testing.T, s store.Store, e *store.Event, targets ...string) {
	t.Helper()
	dup, err := s.Accept(ctxBG, e, targets, dayKey(e))
	if err != nil || dup {
		t.Fatalf("Accept = %v, %v; want new", dup, err)
	}
}

func take(t *testing.T, q store.Queue, within time.Duration) store.Lease {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctxBG, within)
	defer cancel()
	l, err := q.Take(ctx)
	if err != nil {
		t.Fatalf("Take: %v", err)
	}
	return l
}

func settle(t *testing.T, l store.Lease, o store.Outcome) {
	t.Helper()
	d := l.Delivery()
	d.Attempts++
	done := make(chan error, 1)
	l.Settle(o, &d, func(err error) { done <- err })
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Settle(%s): %v", o, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Settle(%s): no outcome", o)
	}
}

// TestTwoStores: two instances on one server share every delivery
// without handing one to both, and one event sent to both at once is
// stored once.
func TestTwoStores(t *testing.T) {
	ns := startNATS(t)
	a := openUp(t, testConfig(ns.url(), nil))
	defer a.Close()
	b := openUp(t, testConfig(ns.url(), nil))
	defer b.Close()

	const n = 40
	now := time.Now()
	for i := range n {
		mustAccept(t, []store.Store{a, b}[i%2], ev(i, now), "t")
	}
	var mu sync.Mutex
	got := map[store.ID]string{}
	var wg, settles sync.WaitGroup
	ctx, cancel := context.WithTimeout(ctxBG, 20*time.Second)
	defer cancel()
	for name, s := range map[string]*Store{"a": a, "b": b} {
		q, err := s.Queue("t", store.QueueOptions{Lease: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		for range 2 {
			wg.Go(func() {
				for {
					l, err := q.Take(ctx)
					if err != nil {
						return
					}
					mu.Lock()
					if prev, ok := got[l.Delivery().ID]; ok {
						t.Errorf("event taken by %s and %s", prev, name)
					}
					got[l.Delivery().ID] = name
					if len(got) == n {
						cancel()
					}
					mu.Unlock()
					d := l.Delivery()
					settles.Add(1)
					l.Settle(store.Delivered, &d, func(err error) {
						if err != nil {
							t.Errorf("Settle: %v", err)
						}
						settles.Done()
					})
				}
			})
		}
	}
	wg.Wait()
	settles.Wait()
	if len(got) != n {
		t.Fatalf("%d of %d events delivered", len(got), n)
	}
	by := map[string]int{}
	for _, s := range got {
		by[s]++
	}
	t.Logf("deliveries per instance: %v", by)

	// The same event at both instances at once: one of them stores it.
	for round := range 20 {
		e := ev(1000+round, time.Now())
		var dups atomic.Int32
		start := make(chan struct{})
		var wg sync.WaitGroup
		for _, s := range []*Store{a, b} {
			wg.Go(func() {
				<-start
				dup, err := s.Accept(ctxBG, e, []string{"t", "u"}, dayKey(e))
				if err != nil {
					t.Errorf("Accept: %v", err)
				}
				if dup {
					dups.Add(1)
				}
			})
		}
		close(start)
		wg.Wait()
		if d := dups.Load(); d != 1 {
			t.Fatalf("round %d: %d duplicates of 2 concurrent Accepts, want 1", round, d)
		}
	}
	a.counts.invalidate()
	c, err := a.Counts(ctxBG)
	if err != nil {
		t.Fatal(err)
	}
	if c.PendingEvents != 20 || c.Targets["t"].Pending != 20 || c.Targets["u"].Pending != 20 {
		t.Errorf("counts after the races = %+v, want 20 events pending at t and u", c)
	}
}

// TestDedupeSurvivesRestart: with a one-second Nats-Msg-Id window, an
// event sent again after a NATS restart and past the window is still a
// duplicate, whether it was delivered meanwhile or is still pending.
func TestDedupeSurvivesRestart(t *testing.T) {
	ns := startNATS(t)
	cfg := testConfig(ns.url(), nil)
	nc, err := nats.Connect(ns.url())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	s := &Store{cfg: Config{Replicas: 1}, n: namesFor(cfg.Stream)}
	sc := s.streamConfig()
	sc.Duplicates = time.Second
	if _, err := js.CreateStream(ctxBG, sc); err != nil {
		t.Fatal(err)
	}
	nc.Close()

	st := openUp(t, cfg)
	now := time.Now()
	done, pending := ev(1, now), ev(2, now)
	mustAccept(t, st, done, "t")
	mustAccept(t, st, pending, "t")
	q, _ := st.Queue("t", store.QueueOptions{})
	settle(t, take(t, q, 5*time.Second), store.Delivered)

	ns.restart()
	waitUp(t, st)
	// Past the window: only the keys bucket and the one-message-per-
	// subject rule can tell now. (Time passing is the condition.)
	time.Sleep(2 * time.Second)
	for _, e := range []*store.Event{done, pending} {
		again := *e
		again.ReceivedAt = time.Now()
		dup, err := st.Accept(ctxBG, &again, []string{"t"}, dayKey(&again))
		if err != nil || !dup {
			t.Errorf("Accept of %s after a restart past the window = %v, %v; want duplicate", e.ID, dup, err)
		}
		// Without its key, the pending one is still stored once.
		dup, err = st.Accept(ctxBG, &again, []string{"t"}, store.AcceptOptions{})
		if e == pending && (err != nil || !dup) {
			t.Errorf("keyless Accept of a pending event = %v, %v; want duplicate", dup, err)
		}
	}
	st.Close()
}

// TestUnreachableAtOpen: a store opened before its server answers is
// down, fails writes quickly with ErrUnavailable, and comes up by itself.
func TestUnreachableAtOpen(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()

	cfg := testConfig("nats://127.0.0.1:"+strconv.Itoa(port), nil)
	cfg.Timeout = 500 * time.Millisecond
	began := time.Now()
	s := openStore(t, cfg)
	defer s.Close()
	if d := time.Since(began); d > time.Second {
		t.Errorf("Open took %s with the server down", d)
	}
	if up, reason := s.Up(); up || reason == nil {
		t.Errorf("Up = %v, %v; want down with a reason", up, reason)
	} else {
		t.Logf("down: %v", reason)
	}
	e := ev(1, time.Now())
	began = time.Now()
	if _, err := s.Accept(ctxBG, e, []string{"t"}, dayKey(e)); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Accept while down: %v, want ErrUnavailable", err)
	}
	if d := time.Since(began); d > cfg.Timeout {
		t.Errorf("Accept while down answered after %s, want within %s", d, cfg.Timeout)
	}
	q, err := s.Queue("t", store.QueueOptions{})
	if err != nil {
		t.Fatalf("Queue while down: %v", err)
	}

	// Closing a store that never reached its server ends at once too.
	other := openStore(t, cfg)
	began = time.Now()
	if err := other.Close(); err != nil {
		t.Errorf("Close of a store never connected: %v", err)
	}
	if d := time.Since(began); d > time.Second {
		t.Errorf("Close of a store never connected took %s", d)
	}

	startNATSAt(t, port)
	waitUp(t, s)
	mustAccept(t, s, e, "t")
	settle(t, take(t, q, 5*time.Second), store.Delivered)
}

// TestStreamMismatch: an existing stream with other settings keeps the
// store down, says which, and is left as it is.
func TestStreamMismatch(t *testing.T) {
	ns := startNATS(t)
	cfg := testConfig(ns.url(), nil)
	nc, err := nats.Connect(ns.url())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	if _, err := js.CreateStream(ctxBG, jetstream.StreamConfig{Name: cfg.Stream, Subjects: []string{cfg.Stream + ".d.>"}, Retention: jetstream.LimitsPolicy}); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, cfg)
	defer s.Close()
	up, reason := s.Up()
	if up || reason == nil || !strings.Contains(reason.Error(), "limits") || !strings.Contains(reason.Error(), "workqueue") {
		t.Errorf("Up = %v, %v; want down naming retention limits and workqueue", up, reason)
	}
	e := ev(1, time.Now())
	if _, err := s.Accept(ctxBG, e, []string{"t"}, dayKey(e)); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Accept on a mismatched stream: %v, want ErrUnavailable", err)
	}
	st, err := js.Stream(ctxBG, cfg.Stream)
	if err != nil {
		t.Fatal(err)
	}
	if r := st.CachedInfo().Config.Retention; r != jetstream.LimitsPolicy {
		t.Errorf("stream retention changed to %s", r)
	}
	// Once an operator removes it, the store makes its own and comes up.
	if err := js.DeleteStream(ctxBG, cfg.Stream); err != nil {
		t.Fatal(err)
	}
	waitUp(t, s)
	mustAccept(t, s, e, "t")
}

// TestLeaseUpdate: asking for a queue again with another lease changes
// its consumer's AckWait.
func TestLeaseUpdate(t *testing.T) {
	ns := startNATS(t)
	s := openUp(t, testConfig(ns.url(), nil))
	defer s.Close()
	ackWait := func() time.Duration {
		c, err := s.js.Consumer(ctxBG, s.n.stream, token("t"))
		if err != nil {
			return 0
		}
		return c.CachedInfo().Config.AckWait
	}
	for _, lease := range []time.Duration{time.Second, 3 * time.Second} {
		q, err := s.Queue("t", store.QueueOptions{Lease: lease})
		if err != nil {
			t.Fatal(err)
		}
		// The loop applies it before its next pull, which a Take asks for.
		ctx, cancel := context.WithTimeout(ctxBG, 100*time.Millisecond)
		_, _ = q.Take(ctx)
		cancel()
		deadline := time.Now().Add(5 * time.Second)
		for ackWait() != lease && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := ackWait(); got != lease {
			t.Errorf("AckWait = %s, want the lease %s", got, lease)
		}
	}
}

// TestLeaseLapses: a lease neither settled nor extended past its lease
// goes to another instance; one extended in time does not.
func TestLeaseLapses(t *testing.T) {
	ns := startNATS(t)
	a := openUp(t, testConfig(ns.url(), nil))
	defer a.Close()
	b := openUp(t, testConfig(ns.url(), nil))
	defer b.Close()
	opts := store.QueueOptions{Lease: time.Second}
	qa, _ := a.Queue("t", opts)
	qb, _ := b.Queue("t", opts)
	mustAccept(t, a, ev(1, time.Now()), "t")
	la := take(t, qa, 5*time.Second)

	// Extended every 300 ms for 2 s: b gets nothing.
	stop := time.Now().Add(2 * time.Second)
	ctx, cancel := context.WithDeadline(ctxBG, stop)
	got := make(chan store.Lease, 1)
	go func() {
		if l, err := qb.Take(ctx); err == nil {
			got <- l
		}
		close(got)
	}()
	for time.Now().Before(stop) {
		if err := la.Extend(ctxBG); err != nil {
			t.Fatalf("Extend: %v", err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	cancel()
	if l, ok := <-got; ok {
		t.Fatalf("b took %s while a extended its lease", l.Delivery().ID)
	}
	// Left alone, it lapses to b.
	began := time.Now()
	lb := take(t, qb, 10*time.Second)
	if lb.Delivery().ID != la.Delivery().ID {
		t.Fatalf("b took %s, want the lapsed %s", lb.Delivery().ID, la.Delivery().ID)
	}
	t.Logf("lapsed lease taken over after %s", time.Since(began))
	settle(t, lb, store.Delivered)
}

// TestReconnect: a NATS restart under an open store takes it down and up
// again by itself; a Take waiting across it gets what is accepted after.
func TestReconnect(t *testing.T) {
	ns := startNATS(t)
	cfg := testConfig(ns.url(), nil)
	core, logs := observer.New(zap.InfoLevel)
	cfg.Logger = zap.New(core)
	cfg.Token = "s3cret-token"
	s := openUp(t, cfg)
	defer s.Close()
	q, _ := s.Queue("t", store.QueueOptions{})
	got := make(chan store.Lease, 1)
	ctx, cancel := context.WithTimeout(ctxBG, 20*time.Second)
	defer cancel()
	go func() {
		if l, err := q.Take(ctx); err == nil {
			got <- l
		}
		close(got)
	}()
	ns.stop()
	deadline := time.Now().Add(10 * time.Second)
	for up, _ := s.Up(); up; up, _ = s.Up() {
		if time.Now().After(deadline) {
			t.Fatal("store still up with its server stopped")
		}
		time.Sleep(10 * time.Millisecond)
	}
	ns.start()
	began := time.Now()
	waitUp(t, s)
	t.Logf("up again %s after the server", time.Since(began))
	mustAccept(t, s, ev(1, time.Now()), "t")
	l, ok := <-got
	if !ok {
		t.Fatal("Take waiting across the restart got nothing")
	}
	settle(t, l, store.Delivered)
	// Down once, up twice (at open, after the restart), whatever was
	// retried in between; and never the token.
	if n := logs.FilterMessage("nats store down").Len(); n != 1 {
		t.Errorf("%d down logs, want 1", n)
	}
	if n := logs.FilterMessage("nats store up").Len(); n != 2 {
		t.Errorf("%d up logs, want 2", n)
	}
	for _, e := range logs.All() {
		for _, f := range e.Context {
			if strings.Contains(f.String, "s3cret") || strings.Contains(e.Message, "s3cret") || f.Interface != nil && strings.Contains(fmt.Sprint(f.Interface), "s3cret") {
				t.Errorf("log %q shows the token", e.Message)
			}
		}
	}
}

// TestTargetNames: any target name works, and none collides with another.
func TestTargetNames(t *testing.T) {
	names := []string{"plain", "with.dot", "with space", "=x", "ü-ber", "a*b>c", "with_under-dash"}
	seen := map[string]string{}
	for _, n := range names {
		tok := token(n)
		if strings.ContainsAny(tok, ". *>") {
			t.Errorf("token(%q) = %q: not one subject token", n, tok)
		}
		if back, err := targetOf(tok); err != nil || back != n {
			t.Errorf("targetOf(token(%q)) = %q, %v", n, back, err)
		}
		if prev, ok := seen[tok]; ok {
			t.Errorf("%q and %q share token %q", prev, n, tok)
		}
		seen[tok] = n
	}
	ns := startNATS(t)
	s := openUp(t, testConfig(ns.url(), nil))
	defer s.Close()
	e := ev(1, time.Now())
	mustAccept(t, s, e, names...)
	for _, n := range names {
		q, err := s.Queue(n, store.QueueOptions{})
		if err != nil {
			t.Fatal(err)
		}
		l := take(t, q, 5*time.Second)
		if d := l.Delivery(); d.Target != n || d.ID != e.ID {
			t.Errorf("Take at %q = %s at %q", n, d.ID, d.Target)
		}
		settle(t, l, store.Dead)
	}
	c, err := s.Counts(ctxBG)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if c.Targets[n].Dead != 1 {
			t.Errorf("counts at %q = %+v, want 1 dead", n, c.Targets[n])
		}
	}
}

// TestAcceptTooLarge: an event whose message cannot fit in the server's
// max_payload is refused with store.ErrTooLarge (the sender's retries could
// never store it), nothing is written, and a smaller one is stored.
func TestAcceptTooLarge(t *testing.T) {
	ns := startNATSWith(t, func(o *server.Options) { o.MaxPayload = 8 << 10 })
	s := openUp(t, testConfig(ns.url(), nil))
	t.Cleanup(func() { s.Close() })
	now := time.Now()
	// Within the payload by itself, over it with the message's headers.
	big := &store.Event{ID: store.ID{1}, ReceivedAt: now, ContentType: "application/json", Body: make([]byte, 8<<10-20)}
	opts := store.AcceptOptions{KeyExpiry: now.Add(time.Hour)}
	if _, err := s.Accept(t.Context(), big, []string{"crm"}, opts); !errors.Is(err, store.ErrTooLarge) || !strings.Contains(err.Error(), "max_payload") {
		t.Fatalf("Accept of a body over max_payload: %v, want ErrTooLarge naming max_payload", err)
	}
	if seen, err := s.Seen(t.Context(), big.ID, now); err != nil || seen {
		t.Errorf("Seen after the refusal = %v, %v; want false: nothing written", seen, err)
	}
	small := &store.Event{ID: store.ID{2}, ReceivedAt: now, ContentType: "application/json", Body: make([]byte, 4<<10)}
	if dup, err := s.Accept(t.Context(), small, []string{"crm"}, opts); err != nil || dup {
		t.Fatalf("Accept of a body under max_payload = %v, %v", dup, err)
	}
}
