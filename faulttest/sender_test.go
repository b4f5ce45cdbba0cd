//go:build unix

package faulttest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// testSeed is the seed of a test's random choices: FAULTTEST_SEED replays
// a run, otherwise the clock picks one. Either way it is logged.
func testSeed(t *testing.T) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("FAULTTEST_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("FAULTTEST_SEED: %v", err)
		}
		seed = v
	}
	t.Logf("seed %d (FAULTTEST_SEED=%d replays it)", seed, seed)
	return seed
}

// event is one OkHi webhook as a sender holds it.
type event struct {
	id     string // its id in the body
	body   []byte
	resend bool // an exact re-send of an event already acked
}

// newEvent is a v3 event, or with v2 a v2 one (deduped on the triple of
// verification id, status and mode); pad bytes of filler make it bigger.
func newEvent(id string, v2 bool, pad int) event {
	var extra string
	if pad > 0 {
		extra = fmt.Sprintf(`,"extra_undocumented":{"note":%q}`, strings.Repeat("x", pad))
	}
	var body string
	if v2 {
		body = fmt.Sprintf(`{"v2":{"address_verification_id":%q,"verification_status":"verified",`+
			`"verification_mode":"first_time","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn"%s}}`, id, extra)
	} else {
		body = fmt.Sprintf(`{"event_type":"address_verification.completed","event_id":%q,"api_version":"v3",`+
			`"event_timestamp":1715677923,"data":{"location":{"id":"C0DTxgjRdn"},`+
			`"address_verification":{"id":"ONYgUOybCU","status":"verified"}}%s}`, id, extra)
	}
	return event{id: id, body: []byte(body)}
}

// client posts events to the relay the way OkHi's servers do: keep-alive
// connections and a short timeout per request.
type client struct {
	url  string
	http *http.Client
}

func newClient(t *testing.T, p ports, timeout time.Duration) *client {
	tr := &http.Transport{MaxIdleConnsPerHost: 32, IdleConnTimeout: 30 * time.Second, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &client{url: p.relayURL(), http: &http.Client{Transport: tr, Timeout: timeout}}
}

// answer is the relay's answer to one request.
type answer struct {
	status     int
	result     string // accepted or duplicate, on a 200
	eventID    string // on a 200
	retryAfter string
	err        error // no answer: connection error or timeout
	at         time.Time
}

func (a answer) String() string {
	switch {
	case a.err != nil:
		return "error"
	case a.status == http.StatusOK:
		return a.result
	}
	return strconv.Itoa(a.status)
}

func (c *client) post(body []byte) answer {
	req, err := http.NewRequest(http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return answer{err: err, at: time.Now()}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(authHeader, secret)
	resp, err := c.http.Do(req)
	if err != nil {
		return answer{err: err, at: time.Now()}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	a := answer{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After"), at: time.Now()}
	if err != nil {
		// The status came but not the whole answer: for OkHi that is no
		// answer, and the event is sent again.
		return answer{err: err, at: a.at}
	}
	if a.status == http.StatusOK {
		var ack struct {
			Status  string `json:"status"`
			EventID string `json:"event_id"`
		}
		if err := json.Unmarshal(b, &ack); err != nil {
			a.result = "unparsable: " + string(b)
		} else {
			a.result, a.eventID = ack.Status, ack.EventID
		}
	}
	return a
}

// send posts ev until it is answered 200, retrying as OkHi does (after a
// pause that doubles, compressed from OkHi's minutes to milliseconds) on a
// connection error, a timeout or a 503. It gives up when ctx ends, on any
// other answer, or when giveUp (if set) says so after a failed try.
func (c *client) send(ctx context.Context, l *ledger, ev event, giveUp func(tries int, a answer) bool) (answer, bool) {
	pause := 25 * time.Millisecond
	for tries := 1; ; tries++ {
		a := c.post(ev.body)
		l.record(ev, a)
		switch {
		case a.err == nil && a.status == http.StatusOK:
			return a, true
		case a.err == nil && a.status != http.StatusServiceUnavailable:
			return a, false
		case giveUp != nil && giveUp(tries, a):
			return a, false
		}
		select {
		case <-ctx.Done():
			return a, false
		case <-time.After(pause):
		}
		pause = min(2*pause, 250*time.Millisecond)
	}
}

// ledger is what the senders saw: every answer, and every event acked.
type ledger struct {
	mu         sync.Mutex
	acked      map[string]time.Time // relay event_id -> first 200
	okhi       map[string]string    // relay event_id -> id in the body
	idOf       map[string]string    // id in the body -> relay event_id
	ackedEvs   []event              // for exact re-sends
	history    map[string][]string  // id in the body -> answers, for failure messages
	statuses   map[int]int
	violations []string // answers the contract does not allow
	errs       []string // the first few requests without an answer, why

	requests, accepted, duplicates, unavailable, noAnswer int
	resent, resentAccepted                                int
}

func newLedger() *ledger {
	return &ledger{
		acked:    map[string]time.Time{},
		okhi:     map[string]string{},
		idOf:     map[string]string{},
		history:  map[string][]string{},
		statuses: map[int]int{},
	}
}

func (l *ledger) record(ev event, a answer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.requests++
	if h := l.history[ev.id]; len(h) < 12 {
		l.history[ev.id] = append(h, a.String())
	}
	if a.err != nil {
		l.noAnswer++
		if len(l.errs) < 5 {
			l.errs = append(l.errs, a.err.Error())
		}
		return
	}
	l.statuses[a.status]++
	switch a.status {
	case http.StatusOK:
	case http.StatusServiceUnavailable:
		l.unavailable++
		if n, err := strconv.Atoi(a.retryAfter); err != nil || n < 1 {
			l.bad("503 with Retry-After %q", a.retryAfter)
		}
		return
	default:
		l.bad("status %d for event %s", a.status, ev.id)
		return
	}
	switch a.result {
	case "accepted":
		l.accepted++
	case "duplicate":
		l.duplicates++
	default:
		l.bad("200 with status %q", a.result)
		return
	}
	if ev.resend {
		l.resent++
		if a.result == "accepted" {
			l.resentAccepted++
			l.bad("exact re-send of acked event %s (%s) answered accepted, not duplicate", ev.id, a.eventID)
		}
	}
	if prev, ok := l.idOf[ev.id]; ok && prev != a.eventID {
		l.bad("event %s acked as %s, earlier as %s", ev.id, a.eventID, prev)
	}
	if _, ok := l.acked[a.eventID]; !ok {
		l.acked[a.eventID] = a.at
		l.okhi[a.eventID] = ev.id
		l.idOf[ev.id] = a.eventID
		l.ackedEvs = append(l.ackedEvs, event{id: ev.id, body: ev.body, resend: true})
	}
}

func (l *ledger) bad(format string, args ...any) {
	if len(l.violations) < 20 {
		l.violations = append(l.violations, fmt.Sprintf(format, args...))
	}
}

// check fails the test for every answer the contract does not allow.
func (l *ledger) check(t *testing.T) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, b := range l.violations {
		t.Error(b)
	}
}

// randomAcked returns an exact re-send of an acked event.
func (l *ledger) randomAcked(rng *rand.Rand) (event, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.ackedEvs) == 0 {
		return event{}, false
	}
	return l.ackedEvs[rng.IntN(len(l.ackedEvs))], true
}

// ackedEvents returns exact re-sends of every acked event, in ack order.
func (l *ledger) ackedEvents() []event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]event(nil), l.ackedEvs...)
}

func (l *ledger) ackedIDs() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]string, 0, len(l.acked))
	for id := range l.acked {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

func (l *ledger) isAcked(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.acked[id]
	return ok
}

func (l *ledger) ackTime(id string) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.acked[id]
}

func (l *ledger) okhiOf(id string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.okhi[id]
}

func (l *ledger) historyOf(okhiID string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.history[okhiID], ",")
}

// figures are a ledger's counts.
type figures struct {
	requests, acked, accepted, duplicates, unavailable, noAnswer, resent int
}

func (l *ledger) figures() figures {
	l.mu.Lock()
	defer l.mu.Unlock()
	return figures{
		requests: l.requests, acked: len(l.acked), accepted: l.accepted, duplicates: l.duplicates,
		unavailable: l.unavailable, noAnswer: l.noAnswer, resent: l.resent,
	}
}

// loadGen is several senders posting new events at a steady rate, with a
// share of exact re-sends of events already acked.
type loadGen struct {
	workers  int
	interval time.Duration // between one sender's events
	resend   float64       // share of exact re-sends
	prefix   string        // of the events' ids
}

// start runs the senders until ctx ends; wait waits for them. A sender
// still retrying an event when ctx ends goes on for up to 20 s: an event
// it gave up on might have been stored without its 200 reaching it, and
// then delivered though never acked.
func (g loadGen) start(ctx context.Context, c *client, l *ledger, seed uint64) (wait func()) {
	return g.run(ctx, l, seed, func(ctx context.Context, ev event) { c.send(ctx, l, ev, nil) })
}

// run runs the senders, each posting its events with send, until ctx
// ends (see start); ctx of send ends 20 s after that.
func (g loadGen) run(ctx context.Context, l *ledger, seed uint64, send func(context.Context, event)) (wait func()) {
	var wg sync.WaitGroup
	for w := range g.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			finish, giveUp := context.WithCancel(context.Background())
			defer giveUp()
			defer context.AfterFunc(ctx, func() { time.AfterFunc(20*time.Second, giveUp) })()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			for seq := 0; ctx.Err() == nil; {
				ev, ok := event{}, false
				if rng.Float64() < g.resend {
					ev, ok = l.randomAcked(rng)
				}
				if !ok {
					ev = newEvent(fmt.Sprintf("%s-%d-%06d", g.prefix, w, seq), seq%5 == 4, 0)
					seq++
				}
				send(finish, ev)
				select {
				case <-ctx.Done():
				case <-time.After(g.interval):
				}
			}
		}()
	}
	return wg.Wait
}

// percentile returns the p-th percentile (0 < p <= 100) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(float64(len(s))*p/100+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// errSample returns why the first few requests got no answer.
func (l *ledger) errSample() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.errs...)
}
