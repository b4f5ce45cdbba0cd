package caddymodule

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestSenderAnswers walks the contract's table of answers, in order: each
// step is one request to a live relay.
func TestSenderAnswers(t *testing.T) {
	const port = 9080
	target := newTarget(t, http.StatusOK)
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay answers {
		auth_header X-Secret %s rotated-secret
		max_body 1KiB
		storage %s
		forward crm %s
	}`, secret, t.TempDir(), target.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)
	m0 := scrape(t, tester.Client)

	event := okhiEvent("01HZ3QK7V6J8N2W4X5Y6Z7A8B9", "verified")
	// A valid event exactly max_body long.
	padded := fmt.Sprintf(`{"event_id":"padded","pad":"%s"}`, strings.Repeat("x", 1024-len(`{"event_id":"padded","pad":""}`)))
	tooLarge := fmt.Sprintf(`{"event_id":"large","pad":"%s"}`, strings.Repeat("x", 1024))
	auth := http.Header{"X-Secret": {secret}, "Content-Type": {"application/json"}}

	steps := []struct {
		name    string
		method  string
		header  http.Header
		body    string
		chunked bool // send the body without Content-Length
		// wantStatus is the HTTP status; wantAck the ack's status for 200s.
		wantStatus int
		wantAck    string
		wantID     string
		wantHeader http.Header
		wantBody   string // substring of non-200 answers
	}{
		{name: "new event", method: http.MethodPost, header: auth, body: event, wantStatus: 200, wantAck: "accepted", wantID: okhiEventID(t, event)},
		{name: "re-delivery", method: http.MethodPost, header: auth, body: event, wantStatus: 200, wantAck: "duplicate", wantID: okhiEventID(t, event)},
		{
			name: "re-delivery with the rotated secret", method: http.MethodPost,
			header: http.Header{"X-Secret": {"rotated-secret"}}, body: event,
			wantStatus: 200, wantAck: "duplicate", wantID: okhiEventID(t, event),
		},
		{name: "body of exactly max_body", method: http.MethodPost, header: auth, body: padded, wantStatus: 200, wantAck: "accepted", wantID: okhiEventID(t, padded)},
		{name: "wrong secret", method: http.MethodPost, header: http.Header{"X-Secret": {"guess"}}, body: event, wantStatus: 401, wantBody: "unauthorized"},
		{name: "missing secret", method: http.MethodPost, body: event, wantStatus: 401, wantBody: "unauthorized"},
		{name: "secret sent twice", method: http.MethodPost, header: http.Header{"X-Secret": {secret, secret}}, body: event, wantStatus: 401},
		{name: "GET", method: http.MethodGet, header: auth, wantStatus: 405, wantHeader: http.Header{"Allow": {"POST"}}},
		{name: "PUT", method: http.MethodPut, header: auth, body: event, wantStatus: 405, wantHeader: http.Header{"Allow": {"POST"}}},
		{name: "GET without secret: method is checked first", method: http.MethodGet, wantStatus: 405, wantHeader: http.Header{"Allow": {"POST"}}},
		{name: "too large with Content-Length", method: http.MethodPost, header: auth, body: tooLarge, wantStatus: 413},
		{name: "too large, chunked", method: http.MethodPost, header: auth, body: tooLarge, chunked: true, wantStatus: 413},
		{name: "too large without secret: auth is checked first", method: http.MethodPost, body: tooLarge, wantStatus: 401},
		{name: "not JSON", method: http.MethodPost, header: auth, body: "verification_status=verified", wantStatus: 400, wantBody: "not a JSON object"},
		{name: "JSON array", method: http.MethodPost, header: auth, body: `[` + event + `]`, wantStatus: 400, wantBody: "not a JSON object"},
		{name: "truncated JSON", method: http.MethodPost, header: auth, body: event[:len(event)-1], wantStatus: 400, wantBody: "not a JSON object"},
		{name: "chunked body under max_body", method: http.MethodPost, header: auth, body: okhiEvent("chunked", "verified"), chunked: true, wantStatus: 200, wantAck: "accepted", wantID: okhiEventID(t, okhiEvent("chunked", "verified"))},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			var body io.Reader
			if st.body != "" {
				body = strings.NewReader(st.body)
				if st.chunked {
					body = io.MultiReader(body) // hides the length: sent chunked
				}
			}
			req := newRequest(t, st.method, url, body, st.header)
			if st.chunked && req.ContentLength != 0 {
				t.Fatalf("request has Content-Length %d, want none", req.ContentLength)
			}
			r := do(t, tester.Client, req)
			if r.status != st.wantStatus {
				t.Fatalf("status %d (%q), want %d", r.status, r.body, st.wantStatus)
			}
			if st.wantAck != "" {
				if id := ack(t, r, st.wantAck); id != st.wantID {
					t.Errorf("event_id %s, want %s", id, st.wantID)
				}
			}
			for k := range st.wantHeader {
				if got := r.header.Get(k); got != st.wantHeader.Get(k) {
					t.Errorf("header %s: %q, want %q", k, got, st.wantHeader.Get(k))
				}
			}
			if !strings.Contains(r.body, st.wantBody) {
				t.Errorf("body %q does not contain %q", r.body, st.wantBody)
			}
			if st.wantStatus == 401 && (strings.Contains(r.body, "X-Secret") || strings.Contains(r.body, secret)) {
				t.Errorf("401 body %q tells what was wrong", r.body)
			}
		})
	}

	m1 := scrape(t, tester.Client)
	for result, want := range map[string]float64{
		"accepted": 3, "duplicate": 2, "unauthorized": 4, "invalid": 6, "too_large": 2,
	} {
		assertIncrease(t, m0, m1, "caddy_webhook_relay_received_total", `relay="answers",result="`+result+`"`, want)
	}
	target.waitDelivered(t, 5*time.Second, okhiEventID(t, event), okhiEventID(t, padded), okhiEventID(t, okhiEvent("chunked", "verified")))
}

// TestMaxPending: once max_pending events are owed to a target that is
// down, new events get 503 with Retry-After, and re-deliveries still get
// 200; once the target is back, new events are accepted again.
func TestMaxPending(t *testing.T) {
	const port = 9081
	target := newTarget(t, http.StatusServiceUnavailable)
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay full {
		auth_header X-Secret %s
		max_pending 2
		storage %s
		forward crm %s {
			backoff 10ms 50ms
		}
	}`, secret, t.TempDir(), target.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)
	m0 := scrape(t, tester.Client)

	first := ack(t, post(t, tester, url, okhiEvent("e1", "verified")), "accepted")
	ack(t, post(t, tester, url, okhiEvent("e2", "verified")), "accepted")

	r := post(t, tester, url, okhiEvent("e3", "verified"))
	if r.status != http.StatusServiceUnavailable {
		t.Fatalf("third event: status %d (%q), want 503", r.status, r.body)
	}
	if got := r.header.Get("Retry-After"); got != "5" {
		t.Errorf("Retry-After %q, want 5", got)
	}
	if id := ack(t, post(t, tester, url, okhiEvent("e1", "verified")), "duplicate"); id != first {
		t.Errorf("duplicate's event_id %s, want %s", id, first)
	}
	assertIncrease(t, m0, scrape(t, tester.Client), "caddy_webhook_relay_received_total", `relay="full",result="unavailable"`, 1)

	target.status.Store(http.StatusOK)
	waitFor(t, 5*time.Second, "the third event to be accepted once the target is back", func() bool {
		return post(t, tester, url, okhiEvent("e3", "verified")).status == http.StatusOK
	})
}

// TestHangingTargetDoesNotDelayAck: the ack never waits for a target.
func TestHangingTargetDoesNotDelayAck(t *testing.T) {
	const port = 9082
	target, release := newHangingTarget(t)
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay hang {
		auth_header X-Secret %s
		storage %s
		forward slow %s {
			timeout 1m
			concurrency 1
		}
	}`, secret, t.TempDir(), target.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)

	var ids []string
	for i := range 3 {
		start := time.Now()
		ids = append(ids, ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("hang-%d", i), "verified")), "accepted"))
		if took := time.Since(start); took > time.Second {
			t.Errorf("event %d: ack took %s while the target hangs", i, took)
		}
		if i == 0 {
			waitFor(t, 5*time.Second, "the target to hold the first delivery", func() bool { return target.arrived.Load() >= 1 })
		}
	}
	if n := len(target.requests()); n != 0 {
		t.Fatalf("the target answered %d requests while hanging", n)
	}
	release()
	target.waitDelivered(t, 5*time.Second, ids...)
	assertDeliveredOnce(t, "slow", target, ids)
}

// TestFlakyTargetGetsEveryEvent: a target that answers 503 for a while
// receives every event in the end, each with its Idempotency-Key.
func TestFlakyTargetGetsEveryEvent(t *testing.T) {
	const port = 9083
	const failures = 5
	target := newTarget(t, http.StatusOK)
	target.failFirst.Store(failures)
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay flaky {
		auth_header X-Secret %s
		storage %s
		forward legacy %s {
			backoff 10ms 50ms
			concurrency 2
		}
	}`, secret, t.TempDir(), target.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)
	m0 := scrape(t, tester.Client)

	var ids []string
	for i := range 4 {
		ids = append(ids, ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("flaky-%d", i), "verified")), "accepted"))
	}
	target.waitDelivered(t, 10*time.Second, ids...)
	assertDeliveredOnce(t, "legacy", target, ids)

	// Attempts are numbered from 1: a delivery's successful attempt comes
	// after as many 503s as it got.
	failed := map[string]int{}
	total := 0
	for _, r := range target.requests() {
		key := r.header.Get("Idempotency-Key")
		if r.status == http.StatusServiceUnavailable {
			failed[key]++
			total++
			continue
		}
		if got, want := r.header.Get("X-Webhook-Relay-Attempt"), fmt.Sprint(failed[key]+1); got != want {
			t.Errorf("event %s delivered at attempt %s, want %s", key, got, want)
		}
	}
	if total != failures {
		t.Errorf("%d requests answered 503, want %d", total, failures)
	}
	m1 := waitIncrease(t, tester.Client, m0, "caddy_webhook_relay_deliveries_total", `relay="flaky",result="delivered",target="legacy"`, 4)
	assertIncrease(t, m0, m1, "caddy_webhook_relay_deliveries_total", `relay="flaky",result="retried",target="legacy"`, failures)
	assertIncrease(t, m0, m1, "caddy_webhook_relay_deliveries_total", `relay="flaky",result="delivered",target="legacy"`, 4)
}

// TestForwardedRequest checks what a target receives: the original body
// and Content-Type, the relay's headers, the configured headers (with
// placeholders resolved), and none of the inbound headers.
func TestForwardedRequest(t *testing.T) {
	const port = 9084
	t.Setenv("WEBHOOK_RELAY_TEST_SECRET", "from-env")
	t.Setenv("WEBHOOK_RELAY_TEST_TOKEN", "tok-123")
	target := newTarget(t, http.StatusOK)
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay headers {
		auth_header okhi-authorization {env.WEBHOOK_RELAY_TEST_SECRET}
		storage %s
		forward crm %s/okhi {
			header Authorization "Bearer {env.WEBHOOK_RELAY_TEST_TOKEN}"
			header X-Source okhi
		}
	}`, t.TempDir(), target.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)

	body := okhiEvent("fwd-1", "not_at_address")
	inbound := http.Header{
		"Okhi-Authorization": {"from-env"},
		"Content-Type":       {"application/json; charset=utf-8"},
		"Cookie":             {"session=abc"},
		"X-Request-Id":       {"req-42"},
		"User-Agent":         {"OkHi-Webhooks/3"},
	}
	id := ack(t, do(t, tester.Client, newRequest(t, http.MethodPost, url, strings.NewReader(body), inbound)), "accepted")
	target.waitDelivered(t, 5*time.Second, id)

	got := target.requests()[0]
	if got.body != body {
		t.Errorf("body %q, want the original %q", got.body, body)
	}
	want := map[string]string{
		"Content-Type":            "application/json; charset=utf-8",
		"Idempotency-Key":         id,
		"X-Webhook-Relay-Attempt": "1",
		"X-Webhook-Relay-Target":  "crm",
		"Authorization":           "Bearer tok-123",
		"X-Source":                "okhi",
		// Absent: never forwarded.
		"Okhi-Authorization": "",
		"Cookie":             "",
		"X-Request-Id":       "",
	}
	for k, v := range want {
		if g := got.header.Get(k); g != v {
			t.Errorf("forwarded header %s: %q, want %q", k, g, v)
		}
	}
	if ua := got.header.Get("User-Agent"); !strings.HasPrefix(ua, "caddy-webhook-relay/") {
		t.Errorf("User-Agent %q does not name the relay", ua)
	}
	for k, v := range got.header {
		for _, s := range v {
			if strings.Contains(s, "from-env") {
				t.Errorf("forwarded header %s carries the inbound secret", k)
			}
		}
	}
}

// TestMetricsSurviveReload: counters keep their values across a reload,
// and the new registry takes the collectors without error.
func TestMetricsSurviveReload(t *testing.T) {
	const port = 9085
	target := newTarget(t, http.StatusOK)
	storage := t.TempDir()
	config := func(timeout string) string {
		return siteConfig(port, fmt.Sprintf(`
	webhook_relay metrics {
		auth_header X-Secret %s
		storage %s
		forward crm %s {
			timeout %s
		}
	}`, secret, storage, target.URL, timeout))
	}
	tester := startCaddy(t, config("10s"))
	url := fmt.Sprintf("http://localhost:%d/", port)
	const received = "caddy_webhook_relay_received_total"
	const accepted = `relay="metrics",result="accepted"`
	m0 := scrape(t, tester.Client)

	for i := range 3 {
		ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("m-%d", i), "verified")), "accepted")
	}
	assertIncrease(t, m0, scrape(t, tester.Client), received, accepted, 3)

	loadConfig(t, tester, config("3s"))
	assertIncrease(t, m0, scrape(t, tester.Client), received, accepted, 3)

	ack(t, post(t, tester, url, okhiEvent("m-3", "verified")), "accepted")
	ack(t, post(t, tester, url, okhiEvent("m-0", "verified")), "duplicate")
	m1 := scrape(t, tester.Client)
	assertIncrease(t, m0, m1, received, accepted, 4)
	assertIncrease(t, m0, m1, received, `relay="metrics",result="duplicate"`, 1)

	target.waitDelivered(t, 5*time.Second, okhiEventID(t, okhiEvent("m-3", "verified")))
	waitFor(t, 5*time.Second, "nothing pending", func() bool {
		s, ok := targetStats(t, tester.Client, "metrics", "crm")
		return ok && s.Pending == 0
	})
	m2 := scrape(t, tester.Client)
	assertIncrease(t, m0, m2, "caddy_webhook_relay_deliveries_total", `relay="metrics",result="delivered",target="crm"`, 4)
	// Gauges are read from the live engine.
	assertGauge(t, m2, "caddy_webhook_relay_pending", `relay="metrics",target="crm"`, 0)
	assertGauge(t, m2, "caddy_webhook_relay_dead_letters", `relay="metrics",target="crm"`, 0)
	assertGauge(t, m2, "caddy_webhook_relay_dedupe_entries", `relay="metrics"`, 4)
	assertIncrease(t, m0, m2, "caddy_webhook_relay_ack_duration_seconds_count", `relay="metrics"`, 5)
}

// TestRelayOnTwoListeners: a site with two addresses on two servers gets
// a copy of the handler in each; the copies are one relay, with one
// store and one dedupe.
func TestRelayOnTwoListeners(t *testing.T) {
	const port, other = 9092, 9093
	target := newTarget(t, http.StatusOK)
	tester := startCaddy(t, sitesConfig(port, fmt.Sprintf("http://localhost:%d, http://localhost:%d", port, other), fmt.Sprintf(`
	webhook_relay twice {
		auth_header X-Secret %s
		storage %s
		forward crm %s
	}`, secret, t.TempDir(), target.URL)))

	event := okhiEvent("twice-1", "verified")
	id := ack(t, post(t, tester, fmt.Sprintf("http://localhost:%d/", port), event), "accepted")
	if dup := ack(t, post(t, tester, fmt.Sprintf("http://localhost:%d/", other), event), "duplicate"); dup != id {
		t.Errorf("event_id on the second listener %s, want %s", dup, id)
	}
	target.waitDelivered(t, 5*time.Second, id)
	assertDeliveredOnce(t, "crm", target, []string{id})
	var o overview
	admin(t, tester.Client, http.MethodGet, "/webhook_relay/", "", &o)
	if len(o.Relays) != 1 || o.Relays[0].Name != "twice" {
		t.Errorf("overview lists %+v, want one relay named twice", o.Relays)
	}
}
