//go:build unix

package faulttest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// mode is how a target answers.
type mode int32

const (
	modeOK   mode = iota // 200 at once
	modeDown             // 503 at once
	modeHold             // 200 after target.hold, unless the relay leaves first
	modeHang             // no answer until the relay gives up
)

// target is an internal service in the test process. It records, per
// Idempotency-Key, every request and every 200 it answered: an event is
// delivered only once the target has answered it 200.
type target struct {
	t    *testing.T
	name string
	url  string
	hold time.Duration
	mode atomic.Int32
	// delay is how long a 200 takes: the window in which a kill leaves a
	// delivered event pending, to be delivered again.
	delay atomic.Int64
	quit  chan struct{}

	inflight atomic.Int32 // requests being held or hung

	mu       sync.Mutex
	keys     map[string]*reception
	requests int
	bad      []string
}

// reception is what a target saw of one event.
type reception struct {
	okhiID     string    // the event's id in the body, to name it in failures
	requests   int       // attempts received
	delivered  int       // attempts answered 200
	first      time.Time // first 200
	maxAttempt int       // highest X-Webhook-Relay-Attempt
	abandoned  int       // held attempts the relay left before the answer
}

// newTarget starts a target named as the relay's forward line names it.
func newTarget(t *testing.T, name string, m mode) *target {
	t.Helper()
	tg := &target{t: t, name: name, keys: map[string]*reception{}, quit: make(chan struct{}), hold: 2 * time.Second}
	tg.mode.Store(int32(m))
	srv := httptest.NewServer(http.HandlerFunc(tg.serve))
	tg.url = srv.URL + "/hook/" + name
	t.Cleanup(func() {
		close(tg.quit) // free hung handlers, or Close waits for them
		srv.Close()
		tg.mu.Lock()
		defer tg.mu.Unlock()
		for _, b := range tg.bad {
			t.Errorf("target %s: %s", name, b)
		}
	})
	return tg
}

func (tg *target) set(m mode) { tg.mode.Store(int32(m)) }

func (tg *target) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	key := r.Header.Get("Idempotency-Key")
	attempt, _ := strconv.Atoi(r.Header.Get("X-Webhook-Relay-Attempt"))
	var problem string
	switch {
	case err != nil:
		// The relay gave up on the request (a kill, a timeout): not a
		// contract violation.
		return
	case r.Method != http.MethodPost:
		problem = "method " + r.Method
	case key == "":
		problem = "no Idempotency-Key"
	case r.Header.Get("X-Webhook-Relay-Target") != tg.name:
		problem = fmt.Sprintf("X-Webhook-Relay-Target %q", r.Header.Get("X-Webhook-Relay-Target"))
	case r.Header.Get(authHeader) != "":
		problem = "the inbound auth header was forwarded"
	case attempt < 1:
		problem = fmt.Sprintf("X-Webhook-Relay-Attempt %q", r.Header.Get("X-Webhook-Relay-Attempt"))
	}
	tg.mu.Lock()
	tg.requests++
	if problem != "" {
		if len(tg.bad) < 10 {
			tg.bad = append(tg.bad, problem)
		}
		tg.mu.Unlock()
		http.Error(w, problem, http.StatusBadRequest)
		return
	}
	rc := tg.keys[key]
	if rc == nil {
		rc = &reception{okhiID: okhiIDOf(body)}
		tg.keys[key] = rc
	}
	rc.requests++
	rc.maxAttempt = max(rc.maxAttempt, attempt)
	tg.mu.Unlock()

	switch mode(tg.mode.Load()) {
	case modeDown:
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	case modeHold:
		tg.inflight.Add(1)
		defer tg.inflight.Add(-1)
		select {
		case <-time.After(tg.hold):
		case <-r.Context().Done():
			tg.mu.Lock()
			rc.abandoned++
			tg.mu.Unlock()
			return
		case <-tg.quit:
			return
		}
	case modeHang:
		tg.inflight.Add(1)
		defer tg.inflight.Add(-1)
		select {
		case <-r.Context().Done():
		case <-tg.quit:
		}
		return
	}
	if d := time.Duration(tg.delay.Load()); d > 0 {
		time.Sleep(d)
	}
	tg.mu.Lock()
	rc.delivered++
	if rc.first.IsZero() {
		rc.first = time.Now()
	}
	tg.mu.Unlock()
	w.WriteHeader(http.StatusOK)
}

// okhiIDOf is the id an event's body carries (v3 event_id, or v2
// address_verification_id).
func okhiIDOf(body []byte) string {
	var ev struct {
		EventID string `json:"event_id"`
		V2      struct {
			ID string `json:"address_verification_id"`
		} `json:"v2"`
	}
	_ = json.Unmarshal(body, &ev)
	if ev.EventID != "" {
		return ev.EventID
	}
	return ev.V2.ID
}

// snapshot copies what the target saw, by Idempotency-Key.
func (tg *target) snapshot() map[string]reception {
	tg.mu.Lock()
	defer tg.mu.Unlock()
	out := make(map[string]reception, len(tg.keys))
	for k, rc := range tg.keys {
		out[k] = *rc
	}
	return out
}

// deliveredAt returns when the target first answered key 200.
func (tg *target) deliveredAt(key string) (time.Time, bool) {
	tg.mu.Lock()
	defer tg.mu.Unlock()
	rc := tg.keys[key]
	if rc == nil || rc.delivered == 0 {
		return time.Time{}, false
	}
	return rc.first, true
}

// missing returns the keys of ids the target has not answered 200.
func (tg *target) missing(ids []string) []string {
	tg.mu.Lock()
	defer tg.mu.Unlock()
	var out []string
	for _, id := range ids {
		if rc := tg.keys[id]; rc == nil || rc.delivered == 0 {
			out = append(out, id)
		}
	}
	return out
}

// waitDelivered polls until the target has answered every id 200.
func (tg *target) waitDelivered(ids []string, timeout time.Duration) []string {
	deadline := time.Now().Add(timeout)
	for {
		m := tg.missing(ids)
		if len(m) == 0 || time.Now().After(deadline) {
			return m
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// tally is what a target saw, summed.
type tally struct {
	keys        int // distinct events received
	delivered   int // distinct events answered 200
	requests    int // every request
	redelivered int // 200 answers beyond the first per event
	abandoned   int // held requests the relay left before the answer
	maxAttempt  int
}

func (tg *target) tally() tally {
	var s tally
	snap := tg.snapshot()
	s.keys = len(snap)
	for _, rc := range snap {
		s.requests += rc.requests
		s.abandoned += rc.abandoned
		s.maxAttempt = max(s.maxAttempt, rc.maxAttempt)
		if rc.delivered > 0 {
			s.delivered++
			s.redelivered += rc.delivered - 1
		}
	}
	return s
}

// flap takes the target down and up at random (down about downShare of
// the time, in spells of 100 to 600 ms) until ctx ends, and leaves it up.
func (tg *target) flap(ctx context.Context, seed uint64, downShare float64) (wait func()) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer tg.set(modeOK)
		rng := rand.New(rand.NewPCG(seed, 0xf1a9))
		for {
			m := modeOK
			if rng.Float64() < downShare {
				m = modeDown
			}
			tg.set(m)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Duration(100+rng.IntN(500)) * time.Millisecond):
			}
		}
	}()
	return wg.Wait
}

// checkAcked fails the test for every acked event the target never
// answered 200, and returns how many it lost.
func checkAcked(t *testing.T, tg *target, l *ledger) int {
	t.Helper()
	acked := l.ackedIDs()
	lost := tg.missing(acked)
	sort.Strings(lost)
	for i, id := range lost {
		if i == 20 {
			t.Errorf("... and %d more", len(lost)-20)
			break
		}
		t.Errorf("target %s: acked event %s (okhi id %s, acked at %s) never delivered",
			tg.name, id, l.okhiOf(id), l.ackTime(id).Format("15:04:05.000"))
	}
	return len(lost)
}

// checkNotUnacked fails the test for every event the target was answered
// 200 for that the relay never acked.
func checkNotUnacked(t *testing.T, tg *target, l *ledger) int {
	t.Helper()
	n := 0
	for key, rc := range tg.snapshot() {
		if rc.delivered == 0 || l.isAcked(key) {
			continue
		}
		n++
		if n <= 20 {
			t.Errorf("target %s: event %s (okhi id %s) delivered, but the relay never answered 200 for it; sender saw: %s",
				tg.name, key, rc.okhiID, l.historyOf(rc.okhiID))
		}
	}
	return n
}
