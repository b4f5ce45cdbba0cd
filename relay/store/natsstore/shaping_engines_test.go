package natsstore_test

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store/natsstore"
)

// TestEnginesRateRelayWide: two instances sending to one target with a
// rate keep it between them: any k+1 requests span at least k-1
// intervals. The slack is one whole interval: each instance waits for its
// own slot, and one whose request set off late (a new connection, a
// goroutine not yet scheduled) may land close to the other's next; two
// instances each keeping the rate on their own would still fail it.
func TestEnginesRateRelayWide(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	h := newHook(t, nil)
	tc := target("t", h.URL)
	tc.Concurrency = 4
	tc.Rate = relay.Rate{N: 20, Per: time.Second}
	a := openEngine(t, relayConfig("a", tc), storeConfig(ns.URL()))
	b := openEngine(t, relayConfig("b", tc), storeConfig(ns.URL()))
	const events = 16
	for i := range events {
		receive(t, []*relay.Engine{a, b}[i%2], body(fmt.Sprint("rate-", i)))
	}
	waitFor(t, "every delivery", 20*time.Second, func() bool { return len(h.delivered()) == events })
	reqs := h.requests()
	by := map[string]int{}
	for _, r := range reqs {
		by[r.instance]++
	}
	if by["a"] == 0 || by["b"] == 0 {
		t.Logf("one instance sent everything (%v): the rate held, but the test did not see two senders", by)
	}
	const interval = 50 * time.Millisecond
	slack := interval
	for i := range reqs {
		for j := i + 1; j < len(reqs); j++ {
			if span, want := reqs[j].arrived.Sub(reqs[i].arrived), time.Duration(j-i)*interval-slack; span < want {
				t.Fatalf("requests %d to %d (instances %s..%s) came within %s, want at least %s", i, j, reqs[i].instance, reqs[j].instance, span, want)
			}
		}
	}
}

// TestEnginesDropStaleRelayWide: an event delivered by one instance makes
// an older event of the same key stale at the other.
func TestEnginesDropStaleRelayWide(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	h := newHook(t, nil)
	tc := target("t", h.URL)
	tc.DropStale = &relay.DropStale{KeyPath: "data.location.id", TimePath: "event_timestamp"}
	a := openEngine(t, relayConfig("a", tc), storeConfig(ns.URL()))
	b := openEngine(t, relayConfig("b", tc), storeConfig(ns.URL()))
	ev := func(id string, at int) []byte {
		return []byte(fmt.Sprintf(`{"event_id":%q,"api_version":"v3","event_timestamp":%d,"data":{"location":{"id":"L1"}}}`, id, at))
	}
	newer := receive(t, a, ev("newer", 200))
	waitFor(t, "the newer event's delivery", 10*time.Second, func() bool { return h.delivered()[newer.EventID.String()] == 1 })
	older := receive(t, b, ev("older", 100))
	waitFor(t, "nothing pending", 10*time.Second, func() bool { return pendingEvents(a) == 0 && pendingEvents(b) == 0 })
	if n := h.delivered()[older.EventID.String()]; n != 0 {
		t.Errorf("the older event was sent %d times, want never", n)
	}
	if dead := allDead(t, b); len(dead) != 0 {
		t.Errorf("dead letters %v, want none", dead)
	}
	same := receive(t, b, ev("same-time", 200))
	waitFor(t, "the equal-time event's delivery", 10*time.Second, func() bool { return h.delivered()[same.EventID.String()] == 1 })
}

// BenchmarkEnginesRateAccuracy: 3,000 events to a rate 50/s target
// through two instances on one embedded server (60 s a run); reports the
// rate the target saw between its first and last request:
//
//	go test -run '^$' -bench EnginesRateAccuracy -benchtime 1x ./relay/store/natsstore/
func BenchmarkEnginesRateAccuracy(b *testing.B) {
	const events = 3000
	for range b.N {
		ns := natsstore.StartTestServer(b)
		h := newHook(b, nil)
		tc := target("t", h.URL)
		tc.Concurrency = 8
		tc.Rate = relay.Rate{N: 50, Per: time.Second}
		engines := []*relay.Engine{
			openEngine(b, relayConfig("a", tc), storeConfig(ns.URL())),
			openEngine(b, relayConfig("b", tc), storeConfig(ns.URL())),
		}
		for i := range events {
			receive(b, engines[i%2], body(fmt.Sprint("rate-", i)))
		}
		waitFor(b, "every delivery", 3*time.Minute, func() bool { return len(h.delivered()) == events })
		reqs := h.requests()
		span := reqs[len(reqs)-1].arrived.Sub(reqs[0].arrived)
		rate := float64(len(reqs)-1) / span.Seconds()
		b.ReportMetric(rate, "req/s")
		b.ReportMetric(100*(rate-50)/50, "%off")
	}
}

// TestEnginesOrderByAcrossInstances: two instances deliver one ordered
// target. The first event of a key fails three times; the second event
// of the key, received by the other instance, arrives only after the
// first succeeded, while an event of another key is not held back.
func TestEnginesOrderByAcrossInstances(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	ev := func(id, key string) []byte {
		return []byte(fmt.Sprintf(`{"event_id":%q,"api_version":"v3","data":{"location":{"id":%q}}}`, id, key))
	}
	var failing string
	fails := 0
	var mu sync.Mutex
	h := newHook(t, func(r *http.Request) int {
		mu.Lock()
		defer mu.Unlock()
		if r.Header.Get(relay.HeaderIdempotencyKey) == failing && fails < 3 {
			fails++
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	})
	tc := target("t", h.URL)
	tc.Concurrency = 4
	tc.OrderBy = "data.location.id"
	a := openEngine(t, relayConfig("a", tc), storeConfig(ns.URL()))
	b := openEngine(t, relayConfig("b", tc), storeConfig(ns.URL()))
	cfg, err := relayConfig("a", tc).WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	failing = cfg.EventID(ev("k1-first", "K1")).String()
	mu.Unlock()
	first := receive(t, a, ev("k1-first", "K1"))
	second := receive(t, b, ev("k1-second", "K1"))
	other := receive(t, b, ev("k2", "K2"))
	waitFor(t, "every delivery", 20*time.Second, func() bool { return pendingEvents(a) == 0 && pendingEvents(b) == 0 })
	var order []string
	for _, r := range h.requests() {
		if r.status == http.StatusOK {
			order = append(order, r.key)
		}
	}
	pos := func(id string) int { return slices.Index(order, id) }
	if pos(first.EventID.String()) < 0 || pos(first.EventID.String()) > pos(second.EventID.String()) {
		t.Errorf("delivery order %v: the key's first event must come before its second", order)
	}
	if pos(other.EventID.String()) > pos(first.EventID.String()) {
		t.Errorf("delivery order %v: another key's event was held back behind the retries", order)
	}
	mu.Lock()
	defer mu.Unlock()
	if fails != 3 {
		t.Errorf("the first event failed %d times, want 3", fails)
	}
}

// TestEnginesShapedDelivery: on NATS as on bbolt, a target gets the
// transformed form body with its signature, and a program that errors
// dead-letters that event at that target only, visible from the other
// instance.
func TestEnginesShapedDelivery(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	form := newHook(t, nil)
	plain := newHook(t, nil)
	tc := target("form", form.URL)
	tc.Transform = `if .event_id == "bad" then error("no CRM id") else {id: .event_id, status: .data.status} end`
	tc.BodyFormat = relay.BodyForm
	tc.Sign = []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
	other := target("plain", plain.URL)
	a := openEngine(t, relayConfig("a", tc, other), storeConfig(ns.URL()))
	b := openEngine(t, relayConfig("b", tc, other), storeConfig(ns.URL()))
	good := receive(t, a, body("good"))
	bad := receive(t, a, body("bad"))
	waitFor(t, "every delivery", 10*time.Second, func() bool { return pendingEvents(a) == 0 && pendingEvents(b) == 0 })
	for _, r := range form.requests() {
		if r.key == good.EventID.String() {
			if r.body != "id=good&status=verified" || !strings.HasPrefix(r.sig, "v1,") {
				t.Errorf("form target got body %q, signature %q", r.body, r.sig)
			}
		}
	}
	if form.delivered()[good.EventID.String()] != 1 || form.delivered()[bad.EventID.String()] != 0 {
		t.Errorf("form target deliveries %v: want the good event once and never the bad one", form.delivered())
	}
	if plain.delivered()[bad.EventID.String()] != 1 {
		t.Errorf("the other target did not get the event the transform refused: %v", plain.delivered())
	}
	dead := allDead(t, b)
	if len(dead) != 1 || dead[0].Target != "form" || dead[0].ID != bad.EventID || !strings.Contains(dead[0].LastError, "no CRM id") || dead[0].Attempts != 0 {
		t.Fatalf("dead letters from the other instance %+v, want the bad event at form with jq's message and no attempt", dead)
	}
}

// TestEnginesPause: two instances of a relay on one JetStream. A pause
// made at one holds the target at both, its deliveries wait with no
// attempt used (Event says so at every instance), the pause lasts when
// both restart, and a resume at another instance sends what waited.
func TestEnginesPause(t *testing.T) {
	ns := natsstore.StartTestServer(t)
	held := newHook(t, nil)
	free := newHook(t, nil)
	cfg := func(instance string) relay.Config {
		return relayConfig(instance, target("held", held.URL), target("free", free.URL))
	}
	paused := func(e *relay.Engine) bool {
		for _, s := range e.Overview(t.Context()).Targets {
			if s.Name == "held" {
				return s.Paused
			}
		}
		return false
	}
	waitPaused := func(e *relay.Engine, want bool) {
		t.Helper()
		waitFor(t, fmt.Sprintf("held paused=%v", want), 10*time.Second, func() bool { return paused(e) == want })
	}
	// open returns an engine the test closes itself (before restarting).
	open := func(instance string) *relay.Engine {
		t.Helper()
		e, err := relay.New(cfg(instance), relay.Options{OpenStore: func() (store.Store, error) { return natsstore.Open(storeConfig(ns.URL())) }})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Open(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = e.Close() })
		<-e.Loaded()
		waitStoreUp(t, e)
		return e
	}
	send := func(e *relay.Engine, prefix string, n int) []store.ID {
		t.Helper()
		var ids []store.ID
		for i := range n {
			ids = append(ids, receive(t, e, body(fmt.Sprintf("%s-%d", prefix, i))).EventID)
		}
		waitFor(t, "free to get them", 10*time.Second, func() bool {
			got := free.delivered()
			for _, id := range ids {
				if got[id.String()] == 0 {
					return false
				}
			}
			return true
		})
		if n := len(held.requests()); n != 0 {
			t.Fatalf("the paused target got %d requests", n)
		}
		return ids
	}
	a, b := open("a"), open("b")
	if err := a.Pause(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	waitPaused(b, true)
	ids := send(b, "two", 2)
	ids = append(ids, send(a, "one", 2)...)
	for _, e := range []*relay.Engine{a, b} {
		st, err := e.Event(t.Context(), ids[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, at := range st.Targets {
			switch at.Target {
			case "held":
				if at.State != relay.StatePending || at.Delivery == nil || at.Delivery.Attempts != 0 {
					t.Errorf("event at held: %+v, want pending with no attempt", at)
				}
			case "free":
				if at.State != relay.StateDelivered {
					t.Errorf("event at free: %+v, want delivered", at)
				}
			}
		}
	}
	for _, e := range []*relay.Engine{a, b} {
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
	c := open("c")
	waitPaused(c, true)
	ids = append(ids, send(c, "three", 1)...)
	d := open("d")
	if err := d.Resume(t.Context(), "held"); err != nil {
		t.Fatal(err)
	}
	waitPaused(c, false)
	waitFor(t, "held to get every event", 15*time.Second, func() bool {
		got := held.delivered()
		for _, id := range ids {
			if got[id.String()] == 0 {
				return false
			}
		}
		return true
	})
}
