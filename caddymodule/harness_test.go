package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

// The end-to-end tests run one in-process Caddy (caddytest's, on admin
// localhost:2999), shared by the package's tests, which run one after the
// other. Each test loads its own config, on its own port, and loads an
// empty config when it ends, so that its relays close before the next
// test starts.

const (
	adminURL = "http://localhost:2999"
	secret   = "s3cret"
)

// siteConfig is a Caddyfile serving site on http://localhost:<port>.
func siteConfig(port int, site string) string {
	return sitesConfig(port, fmt.Sprintf("http://localhost:%d", port), site)
}

// sitesConfig is a Caddyfile serving site on addresses.
func sitesConfig(port int, addresses, site string) string {
	return fmt.Sprintf(`{
	admin localhost:2999
	http_port %d
	https_port 9443
	grace_period 1ns
	persist_config off
	skip_install_trust
	log {
		level WARN
	}
}

%s {
%s
}
`, port, addresses, site)
}

// emptyConfig stops every app but keeps the admin endpoint.
const emptyConfig = `{"admin":{"listen":"localhost:2999","config":{"persist":false}}}`

// startCaddy loads config into the shared Caddy and arranges for an empty
// config to be loaded when the test ends. Create the test's targets
// before calling it, so that the relays stop before the targets do.
func startCaddy(t *testing.T, config string) *caddytest.Tester {
	t.Helper()
	tester := caddytest.NewTester(t)
	loadConfig(t, tester, config)
	t.Cleanup(func() { stopCaddy(t) })
	return tester
}

// loadConfig loads (or reloads) a Caddyfile config.
func loadConfig(t *testing.T, tester *caddytest.Tester, config string) {
	t.Helper()
	tester.InitServer(config, "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	// A reload stops the old config's servers (grace_period 1ns): a
	// kept-alive connection to one of them reads EOF on its next request,
	// and net/http sends a POST again on no connection of its own.
	tester.Client.CloseIdleConnections()
}

// stopCaddy loads the empty config: every handler is cleaned up, and the
// last handler of an engine closes it.
func stopCaddy(t *testing.T) {
	t.Helper()
	resp, err := http.Post(adminURL+"/load", "application/json", strings.NewReader(emptyConfig))
	if err != nil {
		t.Errorf("loading the empty config: %v", err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Errorf("loading the empty config: %s: %s", resp.Status, b)
	}
}

// response is an answer, read in full.
type response struct {
	status int
	header http.Header
	body   string
}

// do sends one request and reads the answer.
func do(t *testing.T, c *http.Client, req *http.Request) response {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil && req.Method == http.MethodGet && errors.Is(err, io.EOF) {
		// Caddy rolls a failed load back by starting the old config
		// again, admin endpoint included: a GET sent on a connection to
		// the endpoint it just stopped reads EOF. Ask the new one.
		resp, err = c.Do(req)
	}
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the answer: %v", req.Method, req.URL, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

func newRequest(t *testing.T, method, url string, body io.Reader, header http.Header) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	return req
}

// post sends an event with the test secret.
func post(t *testing.T, tester *caddytest.Tester, url, body string) response {
	t.Helper()
	h := http.Header{"X-Secret": {secret}, "Content-Type": {"application/json"}}
	return do(t, tester.Client, newRequest(t, http.MethodPost, url, strings.NewReader(body), h))
}

// ackBody is the relay's 200 answer.
type ackBody struct {
	Status  string `json:"status"`
	EventID string `json:"event_id"`
}

var eventIDPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

// ack checks that r is a 200 with the given status and returns the event id.
func ack(t *testing.T, r response, wantStatus string) string {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("status %d (%q), want 200 %s", r.status, r.body, wantStatus)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	var a ackBody
	if err := json.Unmarshal([]byte(r.body), &a); err != nil {
		t.Fatalf("answer %q is not JSON: %v", r.body, err)
	}
	if a.Status != wantStatus {
		t.Errorf("status %q, want %q (answer %q)", a.Status, wantStatus, r.body)
	}
	if !eventIDPattern.MatchString(a.EventID) {
		t.Errorf("event_id %q is not 32 hex digits", a.EventID)
	}
	return a.EventID
}

// okhiEvent is a v3 OkHi event with the given id.
func okhiEvent(id, status string) string {
	return fmt.Sprintf(`{"event_type":"address_verification.completed","event_id":%q,"api_version":"v3",`+
		`"event_timestamp":1715677923,"data":{"location":{"id":"C0DTxgjRdn"},`+
		`"address_verification":{"id":"ONYgUOybCU","status":%q}}}`, id, status)
}

// okhiEventID is the event_id the relay derives for an okhiEvent.
func okhiEventID(t *testing.T, body string) string {
	t.Helper()
	cfg, err := relay.Config{Targets: []relay.TargetConfig{{Name: "t", URL: "http://127.0.0.1/"}}}.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	return cfg.EventID([]byte(body)).String()
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fakeTarget is an internal service on 127.0.0.1 that records what it
// receives and answers as the test tells it.
type fakeTarget struct {
	*httptest.Server

	// status is the answer (after the first failFirst requests, which get 503).
	status    atomic.Int32
	failFirst atomic.Int32
	// hang, when set, holds every request until it is closed.
	hang    chan struct{}
	arrived atomic.Int32

	mu   sync.Mutex
	seen []received
}

type received struct {
	header http.Header
	body   string
	status int
}

func newTarget(t *testing.T, status int) *fakeTarget {
	t.Helper()
	f := &fakeTarget{}
	f.status.Store(int32(status))
	f.Server = httptest.NewServer(f)
	t.Cleanup(f.Close)
	return f
}

// newHangingTarget holds every request until release is called (which
// the test's cleanup also does).
func newHangingTarget(t *testing.T) (f *fakeTarget, release func()) {
	t.Helper()
	f = &fakeTarget{hang: make(chan struct{})}
	f.status.Store(http.StatusOK)
	f.Server = httptest.NewServer(f)
	var once sync.Once
	release = func() { once.Do(func() { close(f.hang) }) }
	t.Cleanup(f.Close)
	t.Cleanup(release) // runs first: Close waits for held requests
	return f, release
}

func (f *fakeTarget) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	n := f.arrived.Add(1)
	if f.hang != nil {
		select {
		case <-f.hang:
		case <-r.Context().Done():
			return
		}
	}
	status := int(f.status.Load())
	if n <= f.failFirst.Load() {
		status = http.StatusServiceUnavailable
	}
	f.mu.Lock()
	f.seen = append(f.seen, received{header: r.Header.Clone(), body: string(body), status: status})
	f.mu.Unlock()
	w.WriteHeader(status)
}

// requests returns every request answered so far.
func (f *fakeTarget) requests() []received {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]received(nil), f.seen...)
}

// delivered counts the successful deliveries per Idempotency-Key.
func (f *fakeTarget) delivered() map[string]int {
	out := map[string]int{}
	for _, r := range f.requests() {
		if r.status >= 200 && r.status < 300 {
			out[r.header.Get("Idempotency-Key")]++
		}
	}
	return out
}

// waitDelivered waits until every one of ids was delivered.
func (f *fakeTarget) waitDelivered(t *testing.T, timeout time.Duration, ids ...string) {
	t.Helper()
	waitFor(t, timeout, fmt.Sprintf("delivery of %d events", len(ids)), func() bool {
		got := f.delivered()
		for _, id := range ids {
			if got[id] == 0 {
				return false
			}
		}
		return true
	})
}

// assertDeliveredOnce checks that the target got exactly ids, once each.
func assertDeliveredOnce(t *testing.T, name string, f *fakeTarget, ids []string) {
	t.Helper()
	got := f.delivered()
	for _, id := range ids {
		if got[id] != 1 {
			t.Errorf("%s: event %s delivered %d times, want once", name, id, got[id])
		}
	}
	if len(got) != len(ids) {
		t.Errorf("%s: got %d distinct events, want %d: %v", name, len(got), len(ids), got)
	}
}

// samples are the admin /metrics' samples, keyed by name{labels} (labels
// in Prometheus' sorted order).
type samples map[string]float64

// scrape reads the admin /metrics. Collectors live as long as the process
// (so that counters survive reloads), also across tests: compare counters
// with a scrape taken at the start of the test.
func scrape(t *testing.T, c *http.Client) samples {
	t.Helper()
	r := do(t, c, newRequest(t, http.MethodGet, adminURL+"/metrics", nil, nil))
	if r.status != http.StatusOK {
		t.Fatalf("GET /metrics: %d: %s", r.status, r.body)
	}
	out := samples{}
	for line := range strings.Lines(r.body) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// get returns the sample name{labels}, and whether it exists.
func (s samples) get(name, labels string) (float64, bool) {
	v, ok := s[name+"{"+labels+"}"]
	return v, ok
}

// assertIncrease checks that counter name{labels} grew by want since before.
// waitIncrease waits until the metric has grown by at least want since
// before: a delivery is counted just after the target has answered it.
func waitIncrease(t *testing.T, c *http.Client, before samples, name, labels string, want float64) samples {
	t.Helper()
	was, _ := before.get(name, labels)
	var after samples
	waitFor(t, 5*time.Second, fmt.Sprintf("%s{%s} to grow by %v", name, labels, want), func() bool {
		after = scrape(t, c)
		now, _ := after.get(name, labels)
		return now-was >= want
	})
	return after
}

func assertIncrease(t *testing.T, before, after samples, name, labels string, want float64) {
	t.Helper()
	was, _ := before.get(name, labels)
	now, ok := after.get(name, labels)
	if !ok {
		t.Errorf("metric %s{%s} missing", name, labels)
		return
	}
	if now-was != want {
		t.Errorf("metric %s{%s} grew by %v (from %v to %v), want %v", name, labels, now-was, was, now, want)
	}
}

// assertGauge checks the value of gauge name{labels}.
func assertGauge(t *testing.T, s samples, name, labels string, want float64) {
	t.Helper()
	got, ok := s.get(name, labels)
	if !ok {
		t.Errorf("metric %s{%s} missing", name, labels)
		return
	}
	if got != want {
		t.Errorf("metric %s{%s} = %v, want %v", name, labels, got, want)
	}
}

// admin sends a request to the admin API and decodes a JSON answer into
// out (when out is not nil and the answer is a 200).
func admin(t *testing.T, c *http.Client, method, path, body string, out any) response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r := do(t, c, newRequest(t, method, adminURL+path, rd, http.Header{"Content-Type": {"application/json"}}))
	if out != nil && r.status == http.StatusOK {
		if err := json.Unmarshal([]byte(r.body), out); err != nil {
			t.Fatalf("%s %s: answer %q: %v", method, path, r.body, err)
		}
	}
	return r
}

// overview is the answer of GET /webhook_relay/.
type overview struct {
	Relays []struct {
		Name          string              `json:"name"`
		PendingEvents int64               `json:"pending_events"`
		Targets       []relay.TargetStats `json:"targets"`
	} `json:"relays"`
}

// targetStats returns the overview's counts of relay's target.
func targetStats(t *testing.T, c *http.Client, relayName, target string) (relay.TargetStats, bool) {
	t.Helper()
	var o overview
	if r := admin(t, c, http.MethodGet, "/webhook_relay/", "", &o); r.status != http.StatusOK {
		t.Fatalf("GET /webhook_relay/: %d: %s", r.status, r.body)
	}
	for _, rl := range o.Relays {
		if rl.Name != relayName {
			continue
		}
		for _, ts := range rl.Targets {
			if ts.Name == target {
				return ts, true
			}
		}
	}
	return relay.TargetStats{}, false
}

// deadLetter is one entry of GET /webhook_relay/<name>/dead_letters.
type deadLetter struct {
	EventID        string  `json:"event_id"`
	Target         string  `json:"target"`
	Attempts       int     `json:"attempts"`
	LastError      string  `json:"last_error"`
	LastStatus     int     `json:"last_status"`
	ReceivedAt     string  `json:"received_at"`
	FirstAttemptAt *string `json:"first_attempt_at"`
	LastAttemptAt  *string `json:"last_attempt_at"`
	Body           string  `json:"body"`
}

type deadLetterPage struct {
	DeadLetters []deadLetter `json:"dead_letters"`
	NextCursor  *string      `json:"next_cursor"`
}

// allDeadLetters pages through a relay's dead letters, limit at a time.
func allDeadLetters(t *testing.T, c *http.Client, relayName, query string, limit int) (all []deadLetter, pages int) {
	t.Helper()
	cursor := ""
	for {
		path := fmt.Sprintf("/webhook_relay/%s/dead_letters?limit=%d&cursor=%s%s", relayName, limit, url.QueryEscape(cursor), query)
		var p deadLetterPage
		if r := admin(t, c, http.MethodGet, path, "", &p); r.status != http.StatusOK {
			t.Fatalf("GET %s: %d: %s", path, r.status, r.body)
		}
		if p.NextCursor == nil {
			t.Fatalf("GET %s: no next_cursor field", path)
		}
		if len(p.DeadLetters) > limit {
			t.Fatalf("GET %s: %d entries, over the limit %d", path, len(p.DeadLetters), limit)
		}
		pages++
		all = append(all, p.DeadLetters...)
		if *p.NextCursor == "" {
			return all, pages
		}
		if pages > 100 {
			t.Fatalf("GET %s: paging does not end", path)
		}
		cursor = *p.NextCursor
	}
}
