package relay

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// TestForwardedRequest: a target gets exactly the contract's headers and
// the original bytes.
func TestForwardedRequest(t *testing.T) {
	target := newTestTarget(t, nil)
	tc := fastTarget("legacy-billing", target.URL+"/hooks/okhi?src=relay")
	tc.Headers = http.Header{"X-Api-Key": {"internal-key"}, "X-Tenant": {"a", "b"}}
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: boltStore(tempBolt(t))})

	// Odd spacing, unicode and escapes: forwarded byte for byte.
	body := "{\"v2\": {\"address_verification_id\":\"ONYgUOybCU\" ,\"verification_status\":\"verified\",\n\"verification_mode\":\"first_time\",\"note\":\"M\u00e9r\u00fb \\u00e9 \\\"x\\\"\"}}\n"
	const ctype = "application/json; charset=utf-8"
	res, err := e.Receive(t.Context(), []byte(body), ctype)
	if err != nil || res.Duplicate {
		t.Fatalf("Receive = %+v, %v", res, err)
	}
	waitFor(t, "the delivery", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	reqs := target.requests()
	if len(reqs) != 1 {
		t.Fatalf("target got %d requests, want 1", len(reqs))
	}
	r := reqs[0]
	if string(r.Body) != body {
		t.Errorf("body = %q, want %q", r.Body, body)
	}
	want := map[string][]string{
		"Content-Type":            {ctype},
		"Content-Length":          {strconv.Itoa(len(body))},
		"Idempotency-Key":         {res.EventID.String()},
		"X-Webhook-Relay-Attempt": {"1"},
		"X-Webhook-Relay-Target":  {"legacy-billing"},
		"User-Agent":              {"caddy-webhook-relay/" + Version},
		"X-Api-Key":               {"internal-key"},
		"X-Tenant":                {"a", "b"},
	}
	for k, v := range want {
		if got := r.Header.Values(k); !slices.Equal(got, v) {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	for k := range r.Header {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected header %s: %q", k, r.Header.Values(k))
		}
	}
	for _, k := range []string{"Accept-Encoding", "Okhi-Authorization", "Authorization", "Cookie", "X-Forwarded-For"} {
		if v := r.Header.Values(k); v != nil {
			t.Errorf("forwarded %s: %q", k, v)
		}
	}
	if !strings.HasPrefix(UserAgent, "caddy-webhook-relay/") {
		t.Errorf("UserAgent = %q", UserAgent)
	}
}

func TestForwardedRequestWithoutContentType(t *testing.T) {
	target := newTestTarget(t, nil)
	e := openEngine(t, Config{Source: SourceGeneric, Targets: []TargetConfig{fastTarget("t", target.URL)}}, Options{OpenStore: memStore()})
	body := "\x00\x01 not json \xff"
	if _, err := e.Receive(t.Context(), []byte(body), ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the delivery", 5*time.Second, func() bool { return target.count() == 1 })
	r := target.requests()[0]
	if string(r.Body) != body {
		t.Errorf("body = %q, want %q", r.Body, body)
	}
	if v := r.Header.Values("Content-Type"); v != nil {
		t.Errorf("Content-Type %q invented for an event that had none", v)
	}
}

func TestRetryThenDeliver(t *testing.T) {
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, n int) {
		if n < 3 {
			http.Error(w, "warming up", http.StatusServiceUnavailable)
		}
	})
	m := NewMetrics()
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("t", target.URL)}}, Options{OpenStore: boltStore(tempBolt(t)), Metrics: m})
	id := mustAccept(t, e, v3Body("a"))
	waitFor(t, "delivery after three failures", 10*time.Second, func() bool { return e.PendingEvents() == 0 })
	reqs := target.requests()
	if len(reqs) != 4 {
		t.Fatalf("target got %d requests, want 4", len(reqs))
	}
	for i, r := range reqs {
		if got, want := r.Header.Get(HeaderAttempt), strconv.Itoa(i+1); got != want {
			t.Errorf("request %d: attempt %s, want %s", i, got, want)
		}
		if got := r.Header.Get(HeaderIdempotencyKey); got != id.String() {
			t.Errorf("request %d: idempotency key %s, want %s", i, got, id)
		}
	}
	for _, c := range []struct {
		result string
		want   float64
	}{{"retried", 3}, {"delivered", 1}, {"dead_lettered", 0}} {
		if got := testutil.ToFloat64(m.Deliveries.WithLabelValues(DefaultName, "t", c.result)); got != c.want {
			t.Errorf("deliveries_total{%s} = %v, want %v", c.result, got, c.want)
		}
	}
	if dl := deadLetters(t, e); len(dl) != 0 {
		t.Errorf("dead letters: %+v", dl)
	}
}

// TestRetryBackoffSpacing checks that retries wait: with a 5ms-50ms
// backoff, four failures take at least 5+5+10+20 ms.
func TestRetryBackoffSpacing(t *testing.T) {
	var mu sync.Mutex
	var times []time.Time
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, n int) {
		mu.Lock()
		times = append(times, time.Now())
		mu.Unlock()
		if n < 4 {
			w.WriteHeader(http.StatusInternalServerError)
		}
	})
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("t", target.URL)}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("a"))
	waitFor(t, "delivery", 10*time.Second, func() bool { return e.PendingEvents() == 0 })
	mu.Lock()
	defer mu.Unlock()
	if len(times) != 5 {
		t.Fatalf("%d attempts, want 5", len(times))
	}
	for i, min := range []time.Duration{5, 5, 10, 20} {
		if gap := times[i+1].Sub(times[i]); gap < min*time.Millisecond {
			t.Errorf("gap before attempt %d: %s, want at least %dms", i+2, gap, min)
		}
	}
}

func TestRejectedDeadLettersAtOnce(t *testing.T) {
	for _, code := range []int{400, 401, 404, 409, 410, 422} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
				http.Error(w, "nope", code)
			})
			e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("t", target.URL)}}, Options{OpenStore: memStore()})
			id := mustAccept(t, e, v3Body("a"))
			waitFor(t, "the dead letter", 5*time.Second, func() bool { return targetStats(e, "t").DeadLetters == 1 })
			dl := deadLetters(t, e)
			if len(dl) != 1 {
				t.Fatalf("%d dead letters, want 1", len(dl))
			}
			d := dl[0]
			if d.ID != id || d.Attempts != 1 || d.LastStatus != code || !strings.Contains(d.LastError, strconv.Itoa(code)) ||
				!strings.Contains(d.LastError, "nope") || string(d.Body) != v3Body("a") || d.FirstAttemptAt.IsZero() || d.LastAttemptAt.IsZero() {
				t.Errorf("dead letter = %+v body %q", d.Delivery, d.Body)
			}
			if target.count() != 1 {
				t.Errorf("target got %d requests, want 1", target.count())
			}
			if e.PendingEvents() != 0 {
				t.Errorf("PendingEvents = %d, want 0", e.PendingEvents())
			}
		})
	}
}

func TestMaxAttempts(t *testing.T) {
	target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		http.Error(w, "overloaded", http.StatusTooManyRequests)
	})
	tc := fastTarget("t", target.URL)
	tc.MaxAttempts = 3
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("a"))
	waitFor(t, "the dead letter", 5*time.Second, func() bool { return targetStats(e, "t").DeadLetters == 1 })
	d := deadLetters(t, e)[0]
	if d.Attempts != 3 || d.LastStatus != 429 || !strings.Contains(d.LastError, "max attempts (3)") || !strings.Contains(d.LastError, "overloaded") {
		t.Errorf("dead letter = %+v", d.Delivery)
	}
	if target.count() != 3 {
		t.Errorf("target got %d requests, want 3", target.count())
	}
}

func TestConnectionRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + l.Addr().String() + "/"
	l.Close()
	tc := fastTarget("t", url)
	tc.MaxAttempts = 2
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("a"))
	waitFor(t, "the dead letter", 5*time.Second, func() bool { return targetStats(e, "t").DeadLetters == 1 })
	d := deadLetters(t, e)[0]
	if d.Attempts != 2 || d.LastStatus != 0 || !strings.Contains(d.LastError, "max attempts (2)") || !strings.Contains(d.LastError, "refused") {
		t.Errorf("dead letter = %+v", d.Delivery)
	}
}

func TestAttemptTimeout(t *testing.T) {
	target := newTestTarget(t, func(w http.ResponseWriter, r *http.Request, n int) {
		if n == 0 {
			<-r.Context().Done() // hangs until the relay gives up
		}
	})
	tc := fastTarget("t", target.URL)
	tc.Timeout = 50 * time.Millisecond
	clockless := Options{OpenStore: memStore()}
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, clockless)
	mustAccept(t, e, v3Body("a"))
	waitFor(t, "delivery on the second attempt", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	reqs := target.requests()
	if len(reqs) != 2 || reqs[1].Header.Get(HeaderAttempt) != "2" {
		t.Errorf("target got %d requests, want a timed-out one and a second attempt", len(reqs))
	}

	// A target that always hangs ends as a dead letter saying why.
	hang := newTestTarget(t, func(w http.ResponseWriter, r *http.Request, _ int) { <-r.Context().Done() })
	tc = fastTarget("hang", hang.URL)
	tc.Timeout, tc.MaxAttempts = 20*time.Millisecond, 2
	e2 := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
	mustAccept(t, e2, v3Body("a"))
	waitFor(t, "the dead letter", 5*time.Second, func() bool { return targetStats(e2, "hang").DeadLetters == 1 })
	if d := deadLetters(t, e2)[0]; !strings.Contains(d.LastError, "timeout after 20ms") {
		t.Errorf("last error %q, want it to name the timeout", d.LastError)
	}
}

func TestMaxAge(t *testing.T) {
	t.Run("clock passes max age before the next attempt", func(t *testing.T) {
		target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
			w.WriteHeader(http.StatusServiceUnavailable)
		})
		clock := newFakeClock()
		m := NewMetrics()
		tc := fastTarget("t", target.URL)
		tc.MaxAge = time.Hour
		e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore(clock.Now), Now: clock.Now, Metrics: m})
		received := clock.Now()
		mustAccept(t, e, v3Body("a"))
		waitFor(t, "the first attempt settled", 5*time.Second, func() bool {
			return testutil.ToFloat64(m.Deliveries.WithLabelValues(DefaultName, "t", "retried")) == 1
		})
		clock.Advance(61 * time.Minute)
		waitFor(t, "the dead letter", 5*time.Second, func() bool { return targetStats(e, "t").DeadLetters == 1 })
		d := deadLetters(t, e)[0]
		if !strings.Contains(d.LastError, ReasonMaxAgeExceeded) || d.Attempts != 1 || !d.ReceivedAt.Equal(received) {
			t.Errorf("dead letter = %+v, want %q after 1 attempt", d.Delivery, ReasonMaxAgeExceeded)
		}
		if target.count() != 1 {
			t.Errorf("target got %d requests: an event past its max age was sent again", target.count())
		}
	})
	t.Run("next attempt would be past max age", func(t *testing.T) {
		target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
			http.Error(w, "down", http.StatusBadGateway)
		})
		tc := fastTarget("t", target.URL)
		tc.MaxAge = time.Minute
		tc.BackoffMin, tc.BackoffMax = 2*time.Minute, time.Hour
		e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
		mustAccept(t, e, v3Body("a"))
		waitFor(t, "the dead letter", 5*time.Second, func() bool { return targetStats(e, "t").DeadLetters == 1 })
		d := deadLetters(t, e)[0]
		if !strings.HasPrefix(d.LastError, ReasonMaxAgeExceeded) || !strings.Contains(d.LastError, "502") || d.Attempts != 1 || d.LastStatus != 502 {
			t.Errorf("dead letter = %+v", d.Delivery)
		}
	})
}

// TestRetryAfterHonoured reads the next attempt's time from the store:
// Retry-After wins over the backoff when larger, up to the backoff's max.
func TestRetryAfterHonoured(t *testing.T) {
	tests := []struct {
		name       string
		retryAfter func(now time.Time) string
		max        time.Duration
		wantMin    time.Duration
		wantMax    time.Duration
	}{
		{"seconds", func(time.Time) string { return "120" }, time.Hour, 120 * time.Second, 120 * time.Second},
		{"HTTP date", func(now time.Time) string { return now.Add(5 * time.Minute).Format(http.TimeFormat) }, time.Hour, 5 * time.Minute, 5 * time.Minute},
		{"capped at max", func(time.Time) string { return "86400" }, 10 * time.Minute, 10 * time.Minute, 10 * time.Minute},
		{"smaller ignored", func(time.Time) string { return "0" }, time.Hour, 5 * time.Millisecond, 5 * time.Millisecond},
		{"garbage ignored", func(time.Time) string { return "later" }, time.Hour, 5 * time.Millisecond, 5 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			target := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, n int) {
				if n == 0 {
					w.Header().Set("Retry-After", tt.retryAfter(clock.Now()))
					w.WriteHeader(http.StatusServiceUnavailable)
				}
			})
			st := store.NewMemory(store.MemoryOptions{Now: clock.Now})
			m := NewMetrics()
			tc := fastTarget("t", target.URL)
			tc.BackoffMax = tt.max
			e := openEngine(t, Config{Targets: []TargetConfig{tc}},
				Options{OpenStore: func() (store.Store, error) { return st, nil }, Now: clock.Now, Metrics: m})
			mustAccept(t, e, v3Body("a"))
			waitFor(t, "the first attempt settled", 5*time.Second, func() bool {
				return testutil.ToFloat64(m.Deliveries.WithLabelValues(DefaultName, "t", "retried")) == 1
			})
			var next time.Time
			if err := st.Pending(func(d *store.Delivery) error { next = d.NextAt; return nil }); err != nil {
				t.Fatal(err)
			}
			if wait := next.Sub(clock.Now()); wait < tt.wantMin || wait > tt.wantMax {
				t.Errorf("next attempt in %s, want within [%s, %s]", wait, tt.wantMin, tt.wantMax)
			}
			if target.count() != 1 {
				t.Fatalf("retried before Retry-After: %d requests", target.count())
			}
			clock.Advance(tt.wantMax)
			wake(e)
			waitFor(t, "the retry", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
			if got := target.requests()[1].Header.Get(HeaderAttempt); got != "2" {
				t.Errorf("retry sent as attempt %s, want 2", got)
			}
		})
	}
}

func TestRedirectNotFollowed(t *testing.T) {
	var followed atomic.Int32
	target := newTestTarget(t, func(w http.ResponseWriter, r *http.Request, _ int) {
		if r.URL.Path == "/moved" {
			followed.Add(1)
			return
		}
		http.Redirect(w, r, "/moved", http.StatusFound)
	})
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("t", target.URL+"/hook")}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("a"))
	waitFor(t, "the dead letter", 5*time.Second, func() bool { return targetStats(e, "t").DeadLetters == 1 })
	d := deadLetters(t, e)[0]
	if d.LastStatus != http.StatusFound || d.Attempts != 1 {
		t.Errorf("dead letter = %+v, want the 302 after 1 attempt", d.Delivery)
	}
	if followed.Load() != 0 || target.count() != 1 {
		t.Errorf("the redirect was followed: %d requests to the Location", followed.Load())
	}
}

// TestNoProxyFromEnvironment: the relay's transport has no proxy, so
// HTTP_PROXY cannot send events elsewhere. (net/http never proxies
// loopback addresses anyway, which is why the transport is checked too.)
func TestNoProxyFromEnvironment(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedProxy := "http://" + l.Addr().String()
	l.Close()
	t.Setenv("HTTP_PROXY", closedProxy)
	t.Setenv("HTTPS_PROXY", closedProxy)
	t.Setenv("http_proxy", closedProxy)
	t.Setenv("NO_PROXY", "")
	t.Setenv("no_proxy", "")

	c, tr := newClient(2, nil)
	if k, ok := c.HTTPClient.Transport.(keepConns); !ok || k.rt != tr {
		t.Fatalf("client's transport is %T, not the target's transport", c.HTTPClient.Transport)
	}
	if tr.Proxy != nil {
		t.Error("transport reads a proxy")
	}
	if !tr.DisableCompression {
		t.Error("transport asks for compression: targets would get Accept-Encoding")
	}
	if c.HTTPClient.CheckRedirect == nil {
		t.Error("client follows redirects")
	}
	// Only the quick retries of one attempt: the schedule between
	// attempts is persisted.
	if c.RetryMax != quickRetries || c.Logger != nil {
		t.Errorf("client retries %d times within an attempt, want %d; or logs (%v)", c.RetryMax, quickRetries, c.Logger)
	}

	target := newTestTarget(t, nil)
	e := openEngine(t, Config{Targets: []TargetConfig{fastTarget("t", target.URL)}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("a"))
	waitFor(t, "delivery with HTTP_PROXY set", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	if target.count() != 1 {
		t.Errorf("target got %d requests, want 1", target.count())
	}
}

// TestHangingTargetDoesNotBlockReceive: the ack never waits for a target.
func TestHangingTargetDoesNotBlockReceive(t *testing.T) {
	target, _ := newHangingTarget(t)
	tc := fastTarget("hang", target.URL)
	tc.Timeout = time.Hour
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: boltStore(tempBolt(t))})
	mustAccept(t, e, v3Body("first"))
	waitFor(t, "the target to hang", 5*time.Second, func() bool { return target.inflight.Load() == 1 })
	for i := range 20 {
		start := time.Now()
		mustAccept(t, e, v3Body(fmt.Sprint("more-", i)))
		if took := time.Since(start); took > time.Second {
			t.Fatalf("Receive took %s while the target hangs", took)
		}
	}
	waitFor(t, "both workers hanging", 5*time.Second, func() bool { return target.inflight.Load() == 2 })
	if got := e.PendingEvents(); got != 21 {
		t.Errorf("PendingEvents = %d, want 21", got)
	}
}

func TestConcurrencyLimit(t *testing.T) {
	target, release := newHangingTarget(t)
	tc := fastTarget("slow", target.URL)
	tc.Concurrency = 3
	other := newTestTarget(t, nil)
	e := openEngine(t, Config{Targets: []TargetConfig{tc, fastTarget("other", other.URL)}}, Options{OpenStore: memStore()})
	for i := range 12 {
		mustAccept(t, e, v3Body(fmt.Sprint(i)))
	}
	waitFor(t, "3 requests in flight", 5*time.Second, func() bool { return target.inflight.Load() == 3 })
	// A slow target holds up no other target.
	waitFor(t, "the other target's deliveries", 5*time.Second, func() bool { return other.count() == 12 })
	if got := targetStats(e, "slow").Pending; got != 12 {
		t.Errorf("slow target: %d pending, want 12", got)
	}
	release()
	waitFor(t, "every delivery", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	if got := target.maxIn.Load(); got != 3 {
		t.Errorf("at most %d requests in flight at the slow target, want its concurrency 3", got)
	}
	if got := target.count(); got != 12 {
		t.Errorf("slow target got %d requests, want 12", got)
	}
}

func TestMatchRouting(t *testing.T) {
	verified := newTestTarget(t, nil)
	all := newTestTarget(t, nil)
	tc := fastTarget("verified", verified.URL)
	tc.Match = []Match{
		{Path: "v2.verification_status", Values: []string{"verified", "not_at_address"}},
		{Path: "v2.verification_mode", Values: []string{"first_time"}},
	}
	e := openEngine(t, Config{Targets: []TargetConfig{tc, fastTarget("all", all.URL)}}, Options{OpenStore: memStore()})
	for _, b := range []string{v2Verified, v2NotAtAddress, v2Continuous, v2InProgress, v3Completed} {
		mustAccept(t, e, b)
	}
	waitFor(t, "deliveries", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	var got []string
	for _, r := range verified.requests() {
		got = append(got, string(r.Body))
	}
	slices.Sort(got)
	want := []string{v2NotAtAddress, v2Verified}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("filtered target got %q, want %q", got, want)
	}
	if all.count() != 5 {
		t.Errorf("unfiltered target got %d, want 5", all.count())
	}
}

// TestFailedAttemptsKeepConnections: go-retryablehttp closes idle
// connections after every failed attempt; the engine keeps them, so a
// target answering 503 is not also handed a new TCP connection per retry.
func TestFailedAttemptsKeepConnections(t *testing.T) {
	var conns, requests atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if requests.Add(1) <= 4 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	tc := fastTarget("t", srv.URL)
	tc.Concurrency = 1
	e := openEngine(t, Config{Targets: []TargetConfig{tc}}, Options{OpenStore: memStore()})
	mustAccept(t, e, v3Body("keep-conns"))
	waitFor(t, "the delivery after four 503s", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	if got := requests.Load(); got != 5 {
		t.Fatalf("%d requests, want 5 (four 503s, then 200)", got)
	}
	if got := conns.Load(); got != 1 {
		t.Errorf("%d connections for 5 attempts, want 1", got)
	}
}
