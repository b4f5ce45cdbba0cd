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
	"go.uber.org/zap/zaptest"

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

// waitLeaders waits until every one of streams has a leader.
func (c *natsCluster) waitLeaders(t testing.TB, streams ...string) {
	t.Helper()
	for _, st := range streams {
		c.streamLeader(t, st)
	}
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
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(ctxBG, 500*time.Millisecond)
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
			t.Fatalf("stream %s has no leader after 30s: %v", stream, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitMetaLeader waits until the cluster answers JetStream requests:
// its meta leader is elected. A store opened before would wait out its
// setup's retry delay.
func (c *natsCluster) waitMetaLeader(t testing.TB) {
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
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(ctxBG, time.Second)
		_, err := js.AccountInfo(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no JetStream meta leader after 30s: %v", err)
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
// one event sent to two instances at once, and, while events flow, the
// loss of the stream leader's node, then of every node.
func TestCluster(t *testing.T) {
	began := time.Now()
	c := startCluster(t)
	started := time.Since(began)
	c.waitMetaLeader(t)
	elected := time.Since(began)
	first := openClusterUp(t, clusterConfig(c, nil))
	c.streamLeader(t, first.cfg.Stream)
	first.Close()
	t.Logf("cluster: nodes started in %s, meta leader after %s, first store up after %s",
		started.Round(time.Millisecond), elected.Round(time.Millisecond), time.Since(began).Round(time.Millisecond))

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
	t.Run("Restart", func(t *testing.T) { testClusterRestart(t, c) })
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

// flow accepts events into a store from two writers until stopped (two,
// so that one stuck on a lost request does not stop the flow), and
// records what became of each.
type flow struct {
	t      *testing.T
	s      *Store
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	accepted map[store.ID]bool // acknowledged: accepted, or duplicate
	dups     int               // new events answered duplicate
	failures int
	okEnds   []time.Time // when each success answered
	errEnds  []time.Time // when each failure answered
	samples  []string    // the first failures after mark, for the log
	wrong    []error     // failures that are not ErrUnavailable
	mark     time.Time   // when the fault began
}

func startFlow(t *testing.T, s *Store) *flow {
	f := &flow{t: t, s: s, accepted: map[store.ID]bool{}}
	ctx, cancel := context.WithCancel(ctxBG)
	f.cancel = cancel
	var n atomic.Int32
	for range 2 {
		f.wg.Go(func() {
			for ctx.Err() == nil {
				e := ev(int(n.Add(1)), time.Now())
				start := time.Now()
				dup, err := s.Accept(ctxBG, e, []string{"t"}, dayKey(e))
				end := time.Now()
				f.mu.Lock()
				if err != nil {
					f.failures++
					f.errEnds = append(f.errEnds, end)
					if !f.mark.IsZero() && len(f.samples) < 3 {
						f.samples = append(f.samples, fmt.Sprintf("began %s after the fault, took %s: %v", start.Sub(f.mark).Round(time.Millisecond), end.Sub(start).Round(time.Millisecond), err))
					}
					if !errors.Is(err, store.ErrUnavailable) {
						f.wrong = append(f.wrong, err)
					}
				} else {
					// A duplicate for a new event: its publish went
					// unanswered, was stored, and was made again. Stored
					// all the same.
					if dup {
						f.dups++
					}
					f.accepted[e.ID] = true
					f.okEnds = append(f.okEnds, end)
				}
				f.mu.Unlock()
				if err != nil {
					// What a sender does after a 503, only sooner.
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
	t.Cleanup(f.stop)
	return f
}

func (f *flow) stop() {
	f.cancel()
	f.wg.Wait()
}

func (f *flow) waitFor(what string, within time.Duration, cond func() bool) {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for {
		f.mu.Lock()
		ok := cond()
		f.mu.Unlock()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fault marks the start of a fault, once events flow.
func (f *flow) fault() {
	f.t.Helper()
	f.waitFor("events flowing", 20*time.Second, func() bool { return len(f.accepted) >= 50 })
	f.mu.Lock()
	f.mark = time.Now()
	f.mu.Unlock()
}

// lastOK and lastErr are the ends of the last success and failure; f.mu
// is held.
func (f *flow) lastOK() time.Time  { return last(f.okEnds) }
func (f *flow) lastErr() time.Time { return last(f.errEnds) }

func last(ts []time.Time) time.Time {
	if len(ts) == 0 {
		return time.Time{}
	}
	return ts[len(ts)-1]
}

// recovered waits until accepts have succeeded for two seconds after the
// last failure and after since, then stops the flow.
func (f *flow) recovered(since time.Time) {
	f.t.Helper()
	f.waitFor("intake back", 40*time.Second, func() bool {
		ok := f.lastOK()
		return ok.Sub(since) > 2*time.Second && ok.Sub(f.lastErr()) > 2*time.Second
	})
	f.stop()
}

// firstOKAfter is how long after at the first success answered, or -1.
func (f *flow) firstOKAfter(at time.Time) time.Duration {
	for _, ok := range f.okEnds {
		if ok.After(at) {
			return ok.Sub(at)
		}
	}
	return -1
}

// dry is the longest time after at in which no accept succeeded.
func (f *flow) dry(at time.Time) time.Duration {
	d, prev := time.Duration(0), at
	for _, ok := range f.okEnds {
		if ok.After(at) {
			d = max(d, ok.Sub(prev))
			prev = ok
		}
	}
	return d
}

// report logs the failures and checks that each was ErrUnavailable.
func (f *flow) report() {
	f.t.Helper()
	for _, s := range f.samples {
		f.t.Logf("failed: %s", s)
	}
	for _, err := range f.wrong {
		f.t.Errorf("Accept: %v; want ErrUnavailable or accepted", err)
	}
}

// wantAll takes every acknowledged event from the store's queue.
func (f *flow) wantAll() {
	t := f.t
	t.Helper()
	q, err := f.s.Queue("t", store.QueueOptions{Lease: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	got := map[store.ID]int{}
	missing := func() int {
		m := 0
		for id := range f.accepted {
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
	t.Logf("taken: %d events (%d acknowledged, %d of them lost, %d taken twice)", len(got), len(f.accepted), missing(), twice)
	if m := missing(); m > 0 {
		t.Errorf("%d of %d acknowledged events lost", m, len(f.accepted))
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
	f := startFlow(t, s)
	f.fault()
	c.stop(leader)
	down := time.Since(f.mark)
	t.Cleanup(func() { c.start(leader) }) // whole again for the next test
	// Accepts succeed for two seconds after the last failure, and for
	// at least three after the node was gone.
	f.recovered(f.mark.Add(time.Second))
	// failing: until the end of the last failure; dry: the longest time
	// after the shutdown in which no Accept succeeded.
	failing := time.Duration(0)
	if le := f.lastErr(); le.After(f.mark) {
		failing = le.Sub(f.mark)
	}
	dry := f.dry(f.mark)
	t.Logf("node %d (stream leader) shut down in %s; %d events acknowledged (%d new ones as duplicates), %d Accepts failed, the last ending %s after the shutdown began; longest time without a success: %s",
		leader+1, down.Round(time.Millisecond), len(f.accepted), f.dups, f.failures, failing.Round(time.Millisecond), dry.Round(time.Millisecond))
	f.report()
	if failing > 10*time.Second || dry > 10*time.Second {
		t.Errorf("intake failing until %s after the leader's loss, none succeeding for %s; want under 10s", failing, dry)
	}
	f.wantAll()
}

// testClusterRestart: the whole cluster stops (quorum lost, every node
// down) and starts again from its files while events flow. No
// acknowledged event is lost, intake answers ErrUnavailable meanwhile,
// and succeeds again within 10 s of the cluster being back.
func testClusterRestart(t *testing.T, c *natsCluster) {
	cfg := clusterConfig(c, nil)
	cfg.Logger = zaptest.NewLogger(t)
	s := openClusterUp(t, cfg)
	defer s.Close()
	c.streamLeader(t, cfg.Stream)
	f := startFlow(t, s)
	f.fault()
	// First the quorum goes, then the last node.
	c.stop(0)
	c.stop(1)
	f.waitFor("intake failing without a quorum", 20*time.Second, func() bool { return f.lastErr().After(f.mark) })
	c.stop(2)
	for i := range 3 {
		c.start(i)
	}
	started := time.Now()
	// Back: each of the store's streams has a leader again, which a
	// restarted raft group elects after its election timeout (4 to 9 s).
	n := namesFor(cfg.Stream)
	c.waitLeaders(t, n.stream, n.dead, "KV_"+n.keys, "KV_"+n.attempts, "KV_"+n.stat)
	back := time.Now()
	f.recovered(back)
	d := f.firstOKAfter(started)
	t.Logf("cluster stopped and started again: %d events acknowledged (%d new ones as duplicates), %d Accepts failed; every stream led again %s after the last node started, intake back %s after it",
		len(f.accepted), f.dups, f.failures, back.Sub(started).Round(time.Millisecond), d.Round(time.Millisecond))
	f.report()
	if d-back.Sub(started) > 10*time.Second {
		t.Errorf("intake back %s after the cluster's streams had leaders, want within 10s", d-back.Sub(started))
	}
	f.wantAll()
}
