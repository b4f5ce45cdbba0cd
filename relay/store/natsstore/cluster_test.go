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

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store/storetest"
)

// natsCluster is three embedded JetStream servers routed to each other, each
// of which a test can stop and start again on its files and ports.
type natsCluster struct {
	t       testing.TB
	name    string
	ports   []int // client ports
	cports  []int // cluster (route) ports
	dirs    []string
	mu      sync.Mutex
	servers []*server.Server // nil while stopped
}

// freePorts picks n ports nothing listens on; a node needs its peers'
// route ports before any of them starts.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	ls := make([]net.Listener, n)
	for i := range ls {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls[i] = l
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

func startCluster(t testing.TB) *natsCluster {
	t.Helper()
	const n = 3
	ports := freePorts(t, 2*n)
	c := &natsCluster{t: t, name: "relay-test", ports: ports[:n], cports: ports[n:], servers: make([]*server.Server, n)}
	for range n {
		c.dirs = append(c.dirs, t.TempDir())
	}
	for i := range n {
		c.start(i)
	}
	t.Cleanup(c.stopAll)
	return c
}

func (c *natsCluster) options(i int) server.Options {
	routes := make([]string, len(c.cports))
	for j, p := range c.cports {
		routes[j] = "nats://127.0.0.1:" + strconv.Itoa(p)
	}
	opts := natsserver.DefaultTestOptions
	opts.ServerName = fmt.Sprintf("n%d", i+1)
	opts.Port = c.ports[i]
	opts.JetStream = true
	opts.StoreDir = c.dirs[i]
	opts.Cluster.Name = c.name
	opts.Cluster.Host = "127.0.0.1"
	opts.Cluster.Port = c.cports[i]
	opts.Routes = server.RoutesFromStr(strings.Join(routes, ","))
	return opts
}

func (c *natsCluster) start(i int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.servers[i] != nil {
		return
	}
	opts := c.options(i)
	c.servers[i] = natsserver.RunServer(&opts)
}

func (c *natsCluster) stop(i int) {
	c.mu.Lock()
	s := c.servers[i]
	c.servers[i] = nil
	c.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

func (c *natsCluster) stopAll() {
	for i := range c.servers {
		c.stop(i)
	}
}

func (c *natsCluster) urls() []string {
	out := make([]string, len(c.ports))
	for i, p := range c.ports {
		out[i] = "nats://127.0.0.1:" + strconv.Itoa(p)
	}
	return out
}

// index is the node named name, or -1.
func (c *natsCluster) index(name string) int {
	for i := range c.ports {
		if fmt.Sprintf("n%d", i+1) == name {
			return i
		}
	}
	return -1
}

// streamLeader waits until stream has a leader and returns its node.
func (c *natsCluster) streamLeader(t testing.TB, stream string) int {
	t.Helper()
	nc, err := nats.Connect(strings.Join(c.urls(), ","))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(ctxBG, 2*time.Second)
		st, err := js.Stream(ctx, stream)
		var info *jetstream.StreamInfo
		if err == nil {
			info, err = st.Info(ctx)
		}
		cancel()
		if err == nil && info.Cluster != nil && info.Cluster.Leader != "" {
			if i := c.index(info.Cluster.Leader); i >= 0 {
				return i
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream %s has no leader after 20s: %v", stream, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var clusterStreams atomic.Int32

// clusterConfig is a store config on every node of c, replicas 3, with a
// stream of its own.
func clusterConfig(c *natsCluster, now func() time.Time) Config {
	cfg := testConfig(c.urls()[0], now)
	cfg.URLs = c.urls()
	cfg.Replicas = 3
	cfg.Stream = fmt.Sprintf("RELAY_C%d", clusterStreams.Add(1))
	// Creating five replicated streams on a loaded 2-core machine takes
	// longer than on one node.
	cfg.Timeout = 5 * time.Second
	return cfg
}

// openClusterUp opens a store on c and waits until it is up (the
// cluster's first stream creations wait for a meta leader).
func openClusterUp(t testing.TB, cfg Config) *Store {
	t.Helper()
	s := openStore(t, cfg)
	deadline := time.Now().Add(30 * time.Second)
	for {
		up, err := s.Up()
		if up {
			return s
		}
		if time.Now().After(deadline) {
			s.Close()
			t.Fatalf("store on the cluster not up after 30s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCluster runs on three nodes and replicas 3: the core of the contract,
// one event sent to two instances at once, and the loss of the stream
// leader's node while events flow.
func TestCluster(t *testing.T) {
	c := startCluster(t)
	began := time.Now()
	// The first store waits out the meta leader's election.
	first := openClusterUp(t, clusterConfig(c, nil))
	c.streamLeader(t, first.cfg.Stream)
	first.Close()
	t.Logf("cluster ready for streams after %s", time.Since(began))

	t.Run("Core", func(t *testing.T) {
		storetest.RunCore(t, storetest.Harness{
			Open: func(t testing.TB, now func() time.Time) store.Store {
				return openClusterUp(t, clusterConfig(c, now))
			},
			Shared:    true,
			RealClock: true,
		})
	})
	t.Run("ConcurrentAccept", func(t *testing.T) { testClusterConcurrentAccept(t, c) })
	t.Run("LeaderLoss", func(t *testing.T) { testClusterLeaderLoss(t, c) })
}

// testClusterConcurrentAccept: the same event accepted by two instances at
// once, round after round. A replicated stream answers a publish whose
// message id (or, without one, whose subject under "expect no message
// yet") is still being proposed with a conflict, not with the outcome:
// neither instance may take that for an error, nor for a duplicate before
// the event is stored.
func testClusterConcurrentAccept(t *testing.T, c *natsCluster) {
	cfg := clusterConfig(c, nil)
	// Each instance on a node of its own, so that the publishes reach the
	// leader from two sides.
	a := openClusterUp(t, cfg)
	defer a.Close()
	cfgB := cfg
	cfgB.URLs = []string{c.urls()[1], c.urls()[2], c.urls()[0]}
	b := openClusterUp(t, cfgB)
	defer b.Close()

	const rounds = 60
	targets := []string{"t", "u"}
	var failed, conflicts int
	began := time.Now()
	for round := range rounds {
		e := ev(round, time.Now())
		opts := dayKey(e)
		if round%3 == 2 {
			// No key, so no message id: only the subject's rule decides.
			opts = store.AcceptOptions{}
		}
		var dups atomic.Int32
		errs := make([]error, 2)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, s := range []*Store{a, b} {
			wg.Go(func() {
				<-start
				dup, err := s.Accept(ctxBG, e, targets, opts)
				if err != nil {
					errs[i] = err
					return
				}
				if !dup {
					return
				}
				dups.Add(1)
				// A duplicate is only ever reported for a stored event.
				if seen, err := s.Seen(ctxBG, e.ID, time.Now()); err != nil || !seen {
					errs[i] = fmt.Errorf("duplicate reported, then Seen = %v, %v", seen, err)
				}
			})
		}
		close(start)
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				failed++
				if strings.Contains(err.Error(), "10158") || strings.Contains(err.Error(), "in process") {
					conflicts++
				}
				t.Errorf("round %d: %v", round, err)
			}
		}
		if d := dups.Load(); errors.Join(errs...) == nil && d != 1 {
			t.Errorf("round %d: %d duplicates of 2 concurrent Accepts, want 1", round, d)
		}
	}
	t.Logf("%d rounds in %s: %d Accepts failed, %d of them on an id in process", rounds, time.Since(began), failed, conflicts)
	if t.Failed() {
		return
	}
	// Each event once at each target.
	for _, target := range targets {
		q, err := a.Queue(target, store.QueueOptions{Lease: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		got := map[store.ID]int{}
		for len(got) < rounds {
			l := take(t, q, 20*time.Second)
			got[l.Delivery().ID]++
			settle(t, l, store.Delivered)
		}
		for id, n := range got {
			if n != 1 {
				t.Errorf("target %s: %s taken %d times", target, id, n)
			}
		}
	}
}

// testClusterLeaderLoss: events flow into an instance while the node
// leading the stream is shut down. No acknowledged event is lost, and
// intake fails (with ErrUnavailable) at most while a new leader is
// elected.
func testClusterLeaderLoss(t *testing.T, c *natsCluster) {
	cfg := clusterConfig(c, nil)
	s := openClusterUp(t, cfg)
	defer s.Close()
	leader := c.streamLeader(t, cfg.Stream)

	var (
		mu       sync.Mutex
		accepted = map[store.ID]bool{}
		lastOK   time.Time
		okEnds   []time.Time // when each success answered
		failures int
		firstErr time.Time // the first failure's start
		lastErr  time.Time // the last failure's end
		wrong    []error   // failures that are not ErrUnavailable
		samples  []string  // the first failures, for the log
	)
	var stopped time.Time // set before the first failure that counts
	ctx, cancel := context.WithCancel(ctxBG)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	// Two writers, so that a write stuck on the lost leader does not stop
	// the flow.
	var n atomic.Int32
	for range 2 {
		wg.Go(func() {
			for ctx.Err() == nil {
				e := ev(int(n.Add(1)), time.Now())
				start := time.Now()
				dup, err := s.Accept(ctxBG, e, []string{"t"}, dayKey(e))
				end := time.Now()
				mu.Lock()
				switch {
				case err != nil:
					failures++
					if firstErr.IsZero() {
						firstErr = start
					}
					lastErr = end
					if len(samples) < 3 {
						samples = append(samples, fmt.Sprintf("after %s, for %s: %v", start.Sub(stopped).Round(time.Millisecond), end.Sub(start).Round(time.Millisecond), err))
					}
					if !errors.Is(err, store.ErrUnavailable) {
						wrong = append(wrong, err)
					}
				case dup:
					wrong = append(wrong, fmt.Errorf("new event %s reported duplicate", e.ID))
				default:
					accepted[e.ID] = true
					lastOK = end
					okEnds = append(okEnds, end)
				}
				mu.Unlock()
				if err != nil {
					// What a sender does after a 503, only sooner.
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
	count := func() (int, time.Time) {
		mu.Lock()
		defer mu.Unlock()
		return len(accepted), lastOK
	}
	waitFor := func(what string, within time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(within)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out after %s waiting for %s", within, what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitFor("events flowing", 20*time.Second, func() bool { k, _ := count(); return k >= 50 })

	mu.Lock()
	stopped = time.Now()
	mu.Unlock()
	c.stop(leader)
	down := time.Since(stopped)
	t.Cleanup(func() { c.start(leader) })
	// Flowing again: accepts succeed for two seconds after the last
	// failure, and for at least three after the node was gone.
	waitFor("intake back after the leader's loss", 30*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return lastOK.Sub(stopped) > 3*time.Second && lastOK.Sub(lastErr) > 2*time.Second
	})
	cancel()
	wg.Wait()
	mu.Lock()
	// failing: until the end of the last failure; dry: the longest time
	// after the shutdown in which no Accept succeeded.
	failing, dry := time.Duration(0), time.Duration(0)
	if !lastErr.IsZero() && lastErr.After(stopped) {
		failing = lastErr.Sub(stopped)
	}
	prev := stopped
	for _, at := range okEnds {
		if at.After(stopped) {
			dry = max(dry, at.Sub(prev))
			prev = at
		}
	}
	first := "none"
	if !firstErr.IsZero() {
		first = firstErr.Sub(stopped).Round(time.Millisecond).String()
	}
	t.Logf("node %d (stream leader) shut down in %s; %d events accepted, %d Accepts failed (the first began %s after the shutdown began, the last ended %s after it); longest time without a success after it: %s",
		leader+1, down.Round(time.Millisecond), len(accepted), failures, first, failing.Round(time.Millisecond), dry.Round(time.Millisecond))
	for _, s := range samples {
		t.Logf("failed %s", s)
	}
	for _, err := range wrong {
		t.Errorf("Accept: %v; want ErrUnavailable or accepted", err)
	}
	if failing > 10*time.Second || dry > 10*time.Second {
		t.Errorf("intake failing until %s after the leader's loss, none succeeding for %s; want under 10s", failing, dry)
	}
	want := accepted
	mu.Unlock()

	// Every acknowledged event is there to be taken.
	q, err := s.Queue("t", store.QueueOptions{Lease: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	got := map[store.ID]int{}
	missing := func() int {
		m := 0
		for id := range want {
			if got[id] == 0 {
				m++
			}
		}
		return m
	}
	deadline := time.Now().Add(60 * time.Second)
	for missing() > 0 && time.Now().Before(deadline) {
		ctx, cancel := context.WithDeadline(ctxBG, deadline)
		l, err := q.Take(ctx)
		cancel()
		if err != nil {
			break
		}
		got[l.Delivery().ID]++
		settle(t, l, store.Delivered)
	}
	twice := 0
	for _, k := range got {
		if k > 1 {
			twice++
		}
	}
	t.Logf("taken: %d events (%d accepted, %d lost, %d taken twice)", len(got), len(want), missing(), twice)
	if m := missing(); m > 0 {
		t.Errorf("%d of %d acknowledged events lost", m, len(want))
	}
}
