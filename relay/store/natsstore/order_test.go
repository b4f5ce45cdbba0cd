package natsstore

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// keyedEvent is event i of key k in a drain test.
type keyedEvent struct{ k, i int }

// keyedID is the id of event i of key k at target.
func keyedID(target string, k, i int) store.ID {
	var id store.ID
	copy(id[:], fmt.Sprintf("%.6s%06d%02d", target, k, i))
	return id
}

// acceptKeyedBacklog accepts perKey events for each of keys keys at
// target, 16 writers at once over stores in turn, each writing its keys'
// events one after the other: in the stream the events of a key are then
// close together, the hardest order for a queue that must hold the later
// ones back.
func acceptKeyedBacklog(t testing.TB, stores []*Store, target string, keys, perKey int) map[store.ID]keyedEvent {
	t.Helper()
	const writers = 16
	byID := map[store.ID]keyedEvent{}
	for k := range keys {
		for i := range perKey {
			byID[keyedID(target, k, i)] = keyedEvent{k, i}
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			for k := w; k < keys; k += writers {
				s := stores[k%len(stores)]
				for i := range perKey {
					e := &store.Event{ID: keyedID(target, k, i), ReceivedAt: time.Now(), ContentType: "application/json",
						Body: fmt.Appendf(nil, `{"key":%d,"n":%d}`, k, i)}
					opts := dayKey(e)
					opts.OrderKeys = []string{"key-" + strconv.Itoa(k)}
					if dup, err := s.Accept(ctxBG, e, []string{target}, opts); err != nil || dup {
						errs <- fmt.Errorf("Accept(key %d, event %d) = %v, %v; want new", k, i, dup, err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return byID
}

// drainKeyed takes and delivers everything pending at target from every
// store at once, workers takers each, and returns how long it took. In an
// ordered queue each key's events must come one at a time and in the
// order accepted: an event is taken only after the one before it of its
// key was settled (its attempt over), never while it is leased.
func drainKeyed(t testing.TB, stores []*Store, target string, ordered bool, byID map[store.ID]keyedEvent, workers int) time.Duration {
	t.Helper()
	var (
		mu       sync.Mutex
		next     = map[int]int{}  // by key: the event whose turn it is
		inFlight = map[int]bool{} // by key: one taken and not yet settled
		taken    = map[store.ID]bool{}
		failed   atomic.Bool
		settled  atomic.Int64
	)
	total := int64(len(byID))
	ctx, cancel := context.WithTimeout(ctxBG, 2*time.Minute)
	defer cancel()
	fail := func(format string, args ...any) {
		if failed.CompareAndSwap(false, true) {
			t.Errorf(format, args...)
		}
		cancel()
	}
	var wg, settles sync.WaitGroup
	began := time.Now()
	for si, s := range stores {
		q, err := s.Queue(target, store.QueueOptions{Lease: time.Minute, Ordered: ordered})
		if err != nil {
			t.Fatal(err)
		}
		for range workers {
			wg.Go(func() {
				for {
					l, err := q.Take(ctx)
					if err != nil {
						if !errors.Is(err, context.Canceled) {
							fail("instance %d: Take: %v", si, err)
						}
						return
					}
					d := l.Delivery()
					ke, ok := byID[d.ID]
					if !ok {
						fail("instance %d took %s, not an event of this test", si, d.ID)
						return
					}
					if want := "key-" + strconv.Itoa(ke.k); d.OrderKey != want {
						fail("event %d of key %d: OrderKey %q, want %q", ke.i, ke.k, d.OrderKey, want)
					}
					mu.Lock()
					if taken[d.ID] {
						mu.Unlock()
						fail("event %d of key %d taken twice", ke.i, ke.k)
						return
					}
					taken[d.ID] = true
					if ordered {
						if inFlight[ke.k] {
							fail("key %d: event %d taken by instance %d while an earlier one is under way", ke.k, ke.i, si)
						} else if next[ke.k] != ke.i {
							fail("key %d: event %d taken by instance %d before event %d", ke.k, ke.i, si, next[ke.k])
						}
						inFlight[ke.k] = true
					}
					mu.Unlock()
					// The attempt is over: the next of the key may go from
					// now on, not before.
					mu.Lock()
					inFlight[ke.k] = false
					next[ke.k] = ke.i + 1
					mu.Unlock()
					settles.Add(1)
					d.Attempts++
					l.Settle(store.Delivered, &d, func(err error) {
						defer settles.Done()
						if err != nil {
							fail("Settle of event %d of key %d: %v", ke.i, ke.k, err)
							return
						}
						if settled.Add(1) == total {
							cancel()
						}
					})
				}
			})
		}
	}
	wg.Wait()
	elapsed := time.Since(began)
	settles.Wait()
	if n := settled.Load(); n != total && !failed.Load() {
		t.Fatalf("%s: %d of %d delivered within the deadline", target, n, total)
	}
	return elapsed
}

// TestOrderedTwoInstances: two instances take from one ordered target at
// once; each key's events go strictly in the order accepted, never two at
// once. (Its pace against the same backlog unordered is measured by
// BenchmarkOrderedDrainTwoInstances: speed lives in benchmarks.)
func TestOrderedTwoInstances(t *testing.T) {
	ns := startNATS(t)
	a := openUp(t, testConfig(ns.url(), nil))
	defer a.Close()
	b := openUp(t, testConfig(ns.url(), nil))
	defer b.Close()
	stores := []*Store{a, b}
	const keys, perKey, workers = 200, 3, 8
	drainKeyed(t, stores, "o", true, acceptKeyedBacklog(t, stores, "o", keys, perKey), workers)
	for _, s := range stores {
		s.counts.invalidate()
	}
	c, err := a.Counts(ctxBG)
	if err != nil {
		t.Fatal(err)
	}
	if c.PendingEvents != 0 || len(c.Targets) != 0 {
		t.Errorf("counts after the drain = %+v, want nothing pending", c)
	}
}

// BenchmarkOrderedDrainTwoInstances drains 1,000 keys x 3 events with two
// instances of 8 takers each, unordered and ordered in turn, and reports
// each rate and their ratio (the issue wants ordered at least half):
//
//	go test -run '^$' -bench OrderedDrainTwoInstances -benchtime 3x ./relay/store/natsstore/
func BenchmarkOrderedDrainTwoInstances(b *testing.B) {
	ns := startNATS(b)
	sa := openUp(b, testConfig(ns.url(), nil))
	defer sa.Close()
	sb := openUp(b, testConfig(ns.url(), nil))
	defer sb.Close()
	stores := []*Store{sa, sb}
	const keys, perKey, workers = 1000, 3, 8
	var unordered, ordered time.Duration
	for round := range b.N {
		target := "u" + strconv.Itoa(round)
		unordered += drainKeyed(b, stores, target, false, acceptKeyedBacklog(b, stores, target, keys, perKey), workers)
		target = "o" + strconv.Itoa(round)
		ordered += drainKeyed(b, stores, target, true, acceptKeyedBacklog(b, stores, target, keys, perKey), workers)
	}
	total := float64(keys * perKey * b.N)
	b.ReportMetric(total/unordered.Seconds(), "unordered/s")
	b.ReportMetric(total/ordered.Seconds(), "ordered/s")
	b.ReportMetric(unordered.Seconds()/ordered.Seconds(), "ratio")
}

// keyedEv is event n received now, with a body naming it.
func keyedEv(n int) *store.Event { return ev(n, time.Now()) }

// acceptKeyed accepts e at targets, each with order key key.
func acceptKeyed(t *testing.T, s store.Store, e *store.Event, key string, targets ...string) {
	t.Helper()
	opts := dayKey(e)
	for range targets {
		opts.OrderKeys = append(opts.OrderKeys, key)
	}
	if dup, err := s.Accept(ctxBG, e, targets, opts); err != nil || dup {
		t.Fatalf("Accept(%s) = %v, %v; want new", e.ID, dup, err)
	}
}

// nothing checks that q hands nothing out for a while.
func nothing(t *testing.T, q store.Queue, why string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctxBG, 300*time.Millisecond)
	defer cancel()
	if l, err := q.Take(ctx); err == nil {
		t.Fatalf("%s: Take handed out %s", why, l.Delivery().ID)
	}
}

// TestOrderedSubjects: a keyed delivery is on its key's subject, its
// key in a header; the lookups by event id find it (Seen with no dedupe
// key, Accept again), and its dead letter keeps the key.
func TestOrderedSubjects(t *testing.T) {
	ns := startNATS(t)
	s := openUp(t, testConfig(ns.url(), nil))
	defer s.Close()
	e := keyedEv(1)
	key := "tenant\r\n\"7\""
	opts := store.AcceptOptions{OrderKeys: []string{key, ""}}
	if dup, err := s.Accept(ctxBG, e, []string{"keyed", "plain"}, opts); err != nil || dup {
		t.Fatalf("Accept = %v, %v; want new", dup, err)
	}
	for subj, wantKey := range map[string]string{
		s.n.pendingSubject("keyed", keyToken(key), e.ID): encodeOrderKey(key),
		s.n.pendingSubject("plain", "", e.ID):            "",
	} {
		m, err := directFirst(ctxBG, s.nc, s.n.stream, subj)
		if err != nil || m == nil {
			t.Fatalf("no delivery on %s: %v", subj, err)
		}
		if got := m.header.Get(hdrOrderKey); got != wantKey {
			t.Errorf("%s: %s header %q, want %q", subj, hdrOrderKey, got, wantKey)
		}
	}
	if seen, err := s.Seen(ctxBG, e.ID, time.Now()); err != nil || !seen {
		t.Errorf("Seen of an event stored without a dedupe key = %v, %v; want true", seen, err)
	}
	// Stored without a key: only its deliveries say it is there.
	if dup, err := s.Accept(ctxBG, e, []string{"keyed"}, store.AcceptOptions{OrderKeys: []string{key}}); err != nil || !dup {
		t.Errorf("Accept again at the keyed target alone = %v, %v; want duplicate", dup, err)
	}
	if _, err := s.Accept(ctxBG, keyedEv(2), []string{"a", "b"}, store.AcceptOptions{OrderKeys: []string{"k"}}); err == nil {
		t.Error("Accept with fewer order keys than targets = nil error")
	}

	for _, target := range []string{"plain", "keyed"} {
		q, _ := s.Queue(target, store.QueueOptions{Ordered: true})
		l := take(t, q, 5*time.Second)
		want := key
		if target == "plain" {
			want = ""
		}
		if got := l.Delivery().OrderKey; got != want {
			t.Errorf("%s: Delivery().OrderKey = %q, want %q", target, got, want)
		}
		settle(t, l, store.Dead)
	}
	list, _, err := s.DeadLetters(ctxBG, "keyed", "", 10)
	if err != nil || len(list) != 1 || list[0].OrderKey != key {
		t.Fatalf("dead letters at keyed = %+v, %v; want one with the key", list, err)
	}
	if n, err := s.Replay(ctxBG, nil, "", nil); err != nil || n != 2 {
		t.Fatalf("Replay = %d, %v; want 2", n, err)
	}
	if m, err := directFirst(ctxBG, s.nc, s.n.stream, s.n.pendingSubject("keyed", keyToken(key), e.ID)); err != nil || m == nil {
		t.Errorf("replayed delivery not on its key's subject: %v", err)
	}
	s.counts.invalidate()
	c, err := s.Counts(ctxBG)
	if err != nil {
		t.Fatal(err)
	}
	if c.PendingEvents != 1 || c.Targets["keyed"].Pending != 1 || c.Targets["plain"].Pending != 1 || c.Targets["keyed"].OldestPending.IsZero() {
		t.Errorf("counts after the replay = %+v, want one event pending at keyed and plain", c)
	}
}

// TestOrderedLegacyConsumer: a stream and consumer left by the release
// before order keys (its consumer filtering deliveries without a key)
// take keyed deliveries once a store of this release sets the queue up,
// and again after an instance of that release set its filter back.
func TestOrderedLegacyConsumer(t *testing.T) {
	ns := startNATS(t)
	cfg := testConfig(ns.url(), nil)
	nc, err := nats.Connect(ns.url())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	legacy := &Store{cfg: Config{Replicas: 1}, n: namesFor(cfg.Stream)}
	if _, err := js.CreateStream(ctxBG, legacy.streamConfig()); err != nil {
		t.Fatal(err)
	}
	old := legacy.consumerConfig("t", time.Minute)
	old.FilterSubject = cfg.Stream + ".d.t.*"
	if _, err := js.CreateConsumer(ctxBG, cfg.Stream, old); err != nil {
		t.Fatal(err)
	}
	// A delivery the earlier release stored, as it stored it.
	first := keyedEv(1)
	m := nats.NewMsg(legacy.n.pendingSubject("t", "", first.ID))
	m.Header.Set(hdrReceivedAt, strconv.FormatInt(first.ReceivedAt.UnixNano(), 10))
	m.Header.Set(hdrContentType, first.ContentType)
	m.Data = first.Body
	if _, err := js.PublishMsg(ctxBG, m); err != nil {
		t.Fatal(err)
	}

	s := openUp(t, cfg)
	defer s.Close()
	acceptKeyed(t, s, keyedEv(2), "k", "t")
	acceptKeyed(t, s, keyedEv(3), "k", "t")
	q, _ := s.Queue("t", store.QueueOptions{Lease: time.Minute, Ordered: true})
	got := map[store.ID]store.Lease{}
	for range 2 {
		l := take(t, q, 5*time.Second)
		got[l.Delivery().ID] = l
	}
	if got[first.ID] == nil || got[keyedEv(2).ID] == nil {
		t.Fatalf("took %v, want the earlier release's delivery and the head of k", got)
	}
	nothing(t, q, "the second of k while the first is leased")
	c, err := js.Consumer(ctxBG, cfg.Stream, "t")
	if err != nil {
		t.Fatal(err)
	}
	if f := c.CachedInfo().Config.FilterSubject; f != s.n.pendingFilter("t") {
		t.Errorf("consumer filter %q, want %q", f, s.n.pendingFilter("t"))
	}
	for _, l := range got {
		settle(t, l, store.Delivered)
	}

	// An instance of the earlier release (re)creates the consumer.
	if _, err := js.CreateOrUpdateConsumer(ctxBG, cfg.Stream, old); err != nil {
		t.Fatal(err)
	}
	qq := q.(*queue)
	qq.mu.Lock()
	qq.checked = time.Time{} // as if filterCheck had passed
	qq.mu.Unlock()
	l := take(t, q, 5*time.Second)
	if l.Delivery().ID != keyedEv(3).ID || l.Delivery().OrderKey != "k" {
		t.Fatalf("took %s (%q) after the filter was set back, want the second of k", l.Delivery().ID, l.Delivery().OrderKey)
	}
	settle(t, l, store.Delivered)
}

// TestOrderedRetryingHead: what waits behind a head that waits for its
// retry goes after it, and costs the server a handful of looks, not one
// every few milliseconds.
func TestOrderedRetryingHead(t *testing.T) {
	ns := startNATS(t)
	s := openUp(t, testConfig(ns.url(), nil))
	defer s.Close()
	for n := 1; n <= 3; n++ {
		acceptKeyed(t, s, keyedEv(n), "k", "t")
	}
	q, _ := s.Queue("t", store.QueueOptions{Lease: time.Minute, Ordered: true})
	l := take(t, q, 5*time.Second)
	d := l.Delivery()
	d.Attempts, d.NextAt = 1, time.Now().Add(3*time.Second)
	done := make(chan error, 1)
	l.Settle(store.Retry, &d, func(err error) { done <- err })
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The second of k, as a queue sees it after some looks and after one.
	qq := q.(*queue)
	m, err := directFirst(ctxBG, s.nc, s.n.stream, s.n.pendingSubject("t", keyToken("k"), keyedEv(2).ID))
	if err != nil || m == nil {
		t.Fatalf("second of k not stored: %v", err)
	}
	obj, _ := s.ready()
	for _, tt := range []struct {
		delivered uint64
		min, max  time.Duration
	}{
		{1, orderWaitMin, 2 * orderWaitMin},
		{3, time.Until(d.NextAt), time.Until(d.NextAt) + time.Second},
	} {
		l := &lease{q: qq, seq: m.seq, keyTok: keyToken("k"), delivered: tt.delivered, ordered: true}
		wait, err := qq.headWait(ctxBG, obj, l)
		if err != nil || wait < tt.min-50*time.Millisecond || wait > tt.max {
			t.Errorf("headWait after %d deliveries = %s, %v; want %s to %s", tt.delivered, wait, err, tt.min, tt.max)
		}
	}
	began := time.Now()
	nothing(t, q, "behind a head that waits for its retry")
	l = take(t, q, 10*time.Second)
	if l.Delivery().ID != keyedEv(1).ID {
		t.Fatalf("took %s, want the retried head", l.Delivery().ID)
	}
	settle(t, l, store.Delivered)
	l = take(t, q, 5*time.Second)
	if l.Delivery().ID != keyedEv(2).ID {
		t.Fatalf("took %s, want the second of k", l.Delivery().ID)
	}
	waited := time.Since(began)
	settle(t, l, store.Delivered)
	settle(t, take(t, q, 5*time.Second), store.Delivered)
	info, err := s.js.Consumer(ctxBG, s.n.stream, "t")
	if err != nil {
		t.Fatal(err)
	}
	// Deliveries of the consumer: 3 takes, 1 retry, and the looks of 2
	// and 3 while the head waited, each a few at most.
	n := info.CachedInfo().Delivered.Consumer
	t.Logf("%d deliveries by the consumer over %s", n, waited.Round(time.Millisecond))
	if n > 20 {
		t.Errorf("%d deliveries by the consumer while a head waited %s: want a few looks, not a poll", n, waited)
	}
}

// TestMigrateOrderKeys: deliveries copied from bbolt keep their order
// keys, and their order, and a copied dead letter its key for a replay.
func TestMigrateOrderKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.db")
	b, err := store.OpenBolt(path, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	evs := make([]*store.Event, 5)
	for i := range evs {
		evs[i] = migEvent("ordered"+strconv.Itoa(i), now.Add(time.Duration(i-10)*time.Minute))
	}
	for _, e := range evs[:3] {
		acceptKeyed(t, b, e, "k", "a")
	}
	acceptKeyed(t, b, evs[3], "j", "a", "b")
	acceptKeyed(t, b, evs[4], "j", "b")
	qb, err := b.Queue("b", store.QueueOptions{Ordered: true})
	if err != nil {
		t.Fatal(err)
	}
	l := take(t, qb, 5*time.Second)
	if l.Delivery().ID != evs[3].ID {
		t.Fatalf("bbolt took %s at b, want the head of j", l.Delivery().ID)
	}
	d := l.Delivery()
	d.Attempts, d.LastStatus = 1, 400
	boltSettle(t, l, store.Dead, &d)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	src, err := store.OpenBoltExisting(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	_, s := migTarget(t)
	if sum := migrate(t, ctxBG, src, s, MigrateOptions{}); sum.Pending != 5 || sum.Dead != 1 {
		t.Fatalf("Migrate = %+v, want 5 pending and 1 dead copied", sum)
	}

	qa, _ := s.Queue("a", store.QueueOptions{Lease: time.Minute, Ordered: true})
	heads := map[store.ID]store.Lease{}
	for range 2 {
		l := take(t, qa, 5*time.Second)
		heads[l.Delivery().ID] = l
	}
	if heads[evs[0].ID] == nil || heads[evs[3].ID] == nil {
		t.Fatalf("took %v at a, want the heads of k and j", heads)
	}
	if k := heads[evs[0].ID].Delivery().OrderKey; k != "k" {
		t.Errorf("copied delivery's OrderKey = %q, want k", k)
	}
	nothing(t, qa, "later deliveries of k while its head is leased")
	for _, l := range heads {
		settle(t, l, store.Delivered)
	}
	for _, e := range evs[1:3] {
		l := take(t, qa, 5*time.Second)
		if l.Delivery().ID != e.ID || l.Delivery().OrderKey != "k" {
			t.Fatalf("took %s (%q) at a, want %s of k", l.Delivery().ID, l.Delivery().OrderKey, e.ID)
		}
		settle(t, l, store.Delivered)
	}

	list, _, err := s.DeadLetters(ctxBG, "b", "", 10)
	if err != nil || len(list) != 1 || list[0].ID != evs[3].ID || list[0].OrderKey != "j" {
		t.Fatalf("dead letters at b = %+v, %v; want the copied one with key j", list, err)
	}
	if n, err := s.Replay(ctxBG, nil, "b", nil); err != nil || n != 1 {
		t.Fatalf("Replay = %d, %v", n, err)
	}
	// The replay goes behind what was pending for j at b.
	qbn, _ := s.Queue("b", store.QueueOptions{Lease: time.Minute, Ordered: true})
	for _, e := range []*store.Event{evs[4], evs[3]} {
		l := take(t, qbn, 5*time.Second)
		if l.Delivery().ID != e.ID || l.Delivery().OrderKey != "j" {
			t.Fatalf("took %s (%q) at b, want %s of j", l.Delivery().ID, l.Delivery().OrderKey, e.ID)
		}
		nothing(t, qbn, "the rest of j while one is leased")
		settle(t, l, store.Delivered)
	}
}
