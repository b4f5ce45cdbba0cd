package caddymodule

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// localConfig is a Caddyfile with the harness's global options plus
// globals, serving site on 127.0.0.1:port for any Host (no host matcher:
// a request with a forged Host must still reach the relay).
func localConfig(port int, globals, site string) string {
	return fmt.Sprintf(`{
	admin localhost:2999
	http_port %d
	https_port 9443
	grace_period 1ns
	persist_config off
	skip_install_trust
%s
}

http://:%d {
	bind 127.0.0.1
%s
}
`, port, globals, port, site)
}

// recorder is an HTTP server on 127.0.0.1 that records every request and
// counts every connection, and answers each request with status, then
// reply as the body (and location, when set, as Location). Set reply and
// location before the first request.
type recorder struct {
	*httptest.Server
	status   int
	reply    string
	location string
	conns    atomic.Int32

	mu   sync.Mutex
	reqs []recorded
}

// recorded is one request a recorder received.
type recorded struct {
	method, host, uri string
	header            http.Header
	body              []byte
}

func newRecorder(t *testing.T, status int) *recorder {
	t.Helper()
	rec := &recorder{status: status}
	rec.Server = httptest.NewUnstartedServer(rec)
	rec.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			rec.conns.Add(1)
		}
	}
	rec.Start()
	t.Cleanup(rec.Close)
	return rec
}

func (rec *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	rec.mu.Lock()
	rec.reqs = append(rec.reqs, recorded{method: r.Method, host: r.Host, uri: r.RequestURI, header: r.Header.Clone(), body: body})
	rec.mu.Unlock()
	if rec.location != "" {
		w.Header().Set("Location", rec.location)
	}
	w.WriteHeader(rec.status)
	_, _ = io.WriteString(w, rec.reply)
}

// requests returns the requests received so far.
func (rec *recorder) requests() []recorded {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]recorded(nil), rec.reqs...)
}

// hostileRelay is a live relay under attack, with one target that takes
// one delivery at a time, in the order the events were received.
type hostileRelay struct {
	tester *caddytest.Tester
	name   string
	url    string // http://127.0.0.1:<port>/
	addr   string // 127.0.0.1:<port>
	target *recorder
	// accepted counts the events the relay took, canaries included: its
	// dedupe keys, since every event here is new.
	accepted int
	canaries int
}

// barrier sends a valid event and waits until the target has it. Since
// the target takes one delivery at a time in order of receipt, every
// event the relay accepted before the canary has reached the target by
// then: what has not arrived was not accepted. No sleep stands in for
// "nothing happened".
func (hr *hostileRelay) barrier(t *testing.T) string {
	t.Helper()
	hr.canaries++
	body := okhiEvent(fmt.Sprintf("canary-%d", hr.canaries), "verified")
	h := http.Header{"X-Secret": {hostileSecret}, "Content-Type": {"application/json"}}
	id := ack(t, do(t, hr.tester.Client, newRequest(t, http.MethodPost, hr.url, strings.NewReader(body), h)), "accepted")
	hr.accepted++
	waitFor(t, 10*time.Second, "the canary's delivery", func() bool {
		for _, r := range hr.target.requests() {
			if r.header.Get("Idempotency-Key") == id {
				return true
			}
		}
		return false
	})
	return body
}

// checkNothingKept checks that since the target had seen mark requests,
// it received the canary and the bodies in want (in that order), nothing
// else; that nothing is pending or dead; and that the relay holds exactly
// the dedupe keys of the events it accepted.
func (hr *hostileRelay) checkNothingKept(t *testing.T, mark int, canary string, want ...[]byte) {
	t.Helper()
	got := hr.target.requests()[mark:]
	wantAll := append(append([][]byte(nil), want...), []byte(canary))
	if len(got) != len(wantAll) {
		bodies := make([]string, len(got))
		for i, r := range got {
			bodies[i] = abbrev(r.body)
		}
		t.Fatalf("the target received %d requests, want %d: %q", len(got), len(wantAll), bodies)
	}
	for i, r := range got {
		if !bytes.Equal(r.body, wantAll[i]) {
			t.Errorf("forwarded request %d: body %q, want %q", i, abbrev(r.body), abbrev(wantAll[i]))
		}
	}
	waitFor(t, 5*time.Second, "nothing pending", func() bool {
		s, ok := targetStats(t, hr.tester.Client, hr.name, "crm")
		return ok && s.Pending == 0 && s.DeadLetters == 0
	})
	if got, _ := scrape(t, hr.tester.Client).get("caddy_webhook_relay_dedupe_entries", `relay="`+hr.name+`"`); got != float64(hr.accepted) {
		t.Errorf("the relay holds %v dedupe keys, want %d (the events it accepted)", got, hr.accepted)
	}
}

// abbrev shortens a body for a message.
func abbrev(b []byte) string {
	if len(b) > 80 {
		return fmt.Sprintf("%s...(%d bytes)", b[:80], len(b))
	}
	return string(b)
}

// rawResult is what a client on a raw connection saw.
type rawResult struct {
	status int // 0: the connection ended, or the deadline passed, without an answer
	body   string
	took   time.Duration // until the answer, or the end of the connection
	closed bool          // the server closed the connection before the deadline
	sent   int64         // bytes the client got onto the connection
	// continued: the server sent 100 Continue (asked for the body) first.
	continued bool
}

// rawRequest writes head, then what body yields, on a new connection to
// addr, while it reads the answer; all within limit. With waitClose, it
// also waits for the server to close the connection after answering.
func rawRequest(t *testing.T, addr, head string, body io.Reader, limit time.Duration, waitClose bool) rawResult {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	if err := conn.SetDeadline(start.Add(limit)); err != nil {
		t.Fatal(err)
	}
	var sent atomic.Int64
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		w := &countingWriter{w: conn, n: &sent}
		if _, err := io.WriteString(w, head); err != nil || body == nil {
			return
		}
		_, _ = io.Copy(w, body)
	}()

	var res rawResult
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	for err == nil && resp.StatusCode == http.StatusContinue {
		res.continued = true
		resp, err = http.ReadResponse(br, nil)
	}
	if err != nil {
		res.took = time.Since(start)
		res.closed = !isTimeout(err)
	} else {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		res.status, res.body = resp.StatusCode, string(b)
		res.took = time.Since(start)
		if waitClose {
			_, err := br.ReadByte()
			res.closed = err != nil && !isTimeout(err)
		}
	}
	conn.Close() // ends the writer
	<-wrote
	res.sent = sent.Load()
	return res
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded)
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

// repeat yields the byte b, forever.
type repeat byte

func (r repeat) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

// trickle yields data one byte every interval: a slow-loris client.
type trickle struct {
	data     []byte
	interval time.Duration
}

func (tr *trickle) Read(p []byte) (int, error) {
	if len(tr.data) == 0 {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	time.Sleep(tr.interval) // the client's pace, which is under test
	p[0] = tr.data[0]
	tr.data = tr.data[1:]
	return 1, nil
}

// chunked encodes body as an HTTP/1.1 chunked body, as it is read.
func chunked(body io.Reader) io.Reader {
	pr, pw := io.Pipe()
	go func() {
		cw := httputil.NewChunkedWriter(pw)
		_, err := io.Copy(cw, body)
		if err == nil {
			err = cw.Close()
		}
		if err == nil {
			_, err = io.WriteString(pw, "\r\n")
		}
		pw.CloseWithError(err)
	}()
	return pr
}

// bugDrainBeforeEarlyReply is what TestHostileRequests found (and now
// guards against) about the answers the relay sends without reading the body.
const bugDrainBeforeEarlyReply = "regression: caddymodule/serve.go answered 401, 405 and 413 (by Content-Length) without reading the body " +
	"but leaves the connection open. Caddy 2.11 wraps r.Body (read_body_idle, on by default), so net/http no longer recognises its own " +
	"body type and, before it writes the answer, reads up to 256 KiB of the unread body, waiting for it up to the read timeout " +
	"(default read_body_idle: 1m). An unauthenticated sender thus makes the server read its body; a slow one, or one that sent " +
	"Expect: 100-continue and waits for the 100 that never comes, gets its 401/413 only at the timeout. Fix: set `Connection: close` " +
	"on every answer sent before the body was read to EOF (in reply(), for 401, 405 and 413): net/http then closes instead of draining"

const (
	hostileSecret  = "hostile-secret-0123456789"
	hostileRotated = "hostile-rotated-secret"
	// hostileTimeout is the servers' read_header and read_body timeout.
	hostileTimeout = time.Second
)

// TestHostileRequests sends requests that try to get in, or to make the
// relay take or keep what it must not, to a live relay with the default
// max_body (1 MiB) behind Caddy's server timeouts (read_header and
// read_body, here short). Each must get its contract status, quickly,
// with nothing stored and nothing forwarded; the two inputs the relay
// accepts (deep but valid JSON, invalid UTF-8 inside a JSON string) must
// reach the target byte for byte.
func TestHostileRequests(t *testing.T) {
	const port = 9141
	target := newRecorder(t, http.StatusOK)
	tester := startCaddy(t, localConfig(port, fmt.Sprintf(`	log {
		level WARN
	}
	servers {
		timeouts {
			read_header %[1]s
			read_body %[1]s
		}
	}`, hostileTimeout), fmt.Sprintf(`
	webhook_relay hostile {
		auth_header X-Secret %s %s
		storage %s
		forward crm %s/hook {
			concurrency 1
		}
	}`, hostileSecret, hostileRotated, t.TempDir(), target.URL)))
	hr := &hostileRelay{
		tester: tester,
		name:   "hostile",
		url:    fmt.Sprintf("http://127.0.0.1:%d/", port),
		addr:   fmt.Sprintf("127.0.0.1:%d", port),
		target: target,
	}
	m0 := scrape(t, tester.Client)
	counts := map[string]int{}

	event := okhiEvent("hostile-1", "verified")
	head := func(extra string, contentLength int) string {
		h := "POST / HTTP/1.1\r\nHost: " + hr.addr + "\r\nContent-Type: application/json\r\n" + extra
		if contentLength >= 0 {
			h += fmt.Sprintf("Content-Length: %d\r\n", contentLength)
		} else {
			h += "Transfer-Encoding: chunked\r\n"
		}
		return h + "\r\n"
	}
	withSecret := "X-Secret: " + hostileSecret + "\r\n"
	sameLength := func(i int) string {
		b := []byte(hostileSecret)
		b[i] ^= 1
		return string(b)
	}
	deepValid := `{"event_id":"deep","a":` + strings.Repeat("[", 100_000) + strings.Repeat("]", 100_000) + `}`
	badUTF8 := "{\"event_id\":\"utf8-\xff\xfe\",\"v2\":{\"verification_status\":\"\xed\xa0\x80\xc0\xaf\"}}"

	tests := []struct {
		name string
		// Either a request through the test client...
		header http.Header
		query  string
		body   string
		// ...or raw bytes on a connection: head, then body.
		rawHead string
		rawBody func() io.Reader

		want []int // acceptable statuses; 0: no answer, the connection closed
		// result is the received_total label the request counts under
		// ("": not counted, it never reached the relay).
		result string
		accept bool // accepted: the body must reach the target as sent
		// maxTook bounds the time to the answer (default 5s).
		maxTook time.Duration
		// maxSent bounds the bytes the client could send (0: no bound).
		maxSent   int64
		waitClose bool // the server must close the connection by the deadline
		// early: the relay answers without reading the body, so the
		// answer must come at once, without 100 Continue.
		early bool
	}{
		// Getting in.
		{name: "wrong secret, same length, first byte", header: http.Header{"X-Secret": {sameLength(0)}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "wrong secret, same length, last byte", header: http.Header{"X-Secret": {sameLength(len(hostileSecret) - 1)}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "wrong secret, a prefix", header: http.Header{"X-Secret": {hostileSecret[:10]}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "wrong secret, longer", header: http.Header{"X-Secret": {hostileSecret + "0"}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "wrong secret, 1 KiB", header: http.Header{"X-Secret": {strings.Repeat("h", 1024)}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "empty secret", header: http.Header{"X-Secret": {""}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret twice", header: http.Header{"X-Secret": {hostileSecret, hostileSecret}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret twice, wrong one first", header: http.Header{"X-Secret": {"wrong", hostileSecret}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret twice, wrong one last", header: http.Header{"X-Secret": {hostileSecret, "wrong"}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret and rotated secret", header: http.Header{"X-Secret": {hostileSecret, hostileRotated}}, body: event, want: []int{401}, result: "unauthorized"},
		{
			name:    "secret twice, field names in two cases",
			rawHead: head("X-Secret: "+hostileSecret+"\r\nx-secret: "+hostileSecret+"\r\n", len(event)),
			rawBody: func() io.Reader { return strings.NewReader(event) }, want: []int{401}, result: "unauthorized",
		},
		{name: "secrets comma-joined in one field", header: http.Header{"X-Secret": {hostileSecret + ", " + hostileSecret}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret in the query string", query: "?X-Secret=" + hostileSecret + "&x-secret=" + hostileSecret + "&secret=" + hostileSecret, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret in Authorization", header: http.Header{"Authorization": {hostileSecret}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret as a bearer token", header: http.Header{"Authorization": {"Bearer " + hostileSecret}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret in a cookie", header: http.Header{"Cookie": {"X-Secret=" + hostileSecret}}, body: event, want: []int{401}, result: "unauthorized"},
		{name: "secret in the body", body: `{"X-Secret":"` + hostileSecret + `","event_id":"in-body"}`, want: []int{401}, result: "unauthorized"},

		// Too much, too slowly.
		{
			name:    "chunked body just over max_body",
			rawHead: head(withSecret, -1),
			rawBody: func() io.Reader { return chunked(io.LimitReader(repeat(' '), 1<<20+1)) },
			want:    []int{413}, result: "too_large",
		},
		{
			name:    "Content-Length over max_body, body never sent",
			rawHead: head(withSecret, 2<<20),
			want:    []int{413}, result: "too_large", early: true,
		},
		{
			name:    "Content-Length over max_body with Expect: 100-continue",
			rawHead: head(withSecret+"Expect: 100-continue\r\n", 2<<20),
			want:    []int{413}, result: "too_large", early: true,
		},
		{
			name:    "Expect: 100-continue without the secret",
			rawHead: head("Expect: 100-continue\r\n", len(event)),
			want:    []int{401}, result: "unauthorized", early: true,
		},
		{
			name:    "100 MB body with Content-Length",
			rawHead: head(withSecret, 100<<20),
			rawBody: func() io.Reader { return io.LimitReader(repeat(' '), 100<<20) },
			want:    []int{413}, result: "too_large", maxSent: 32 << 20, waitClose: true,
		},
		{
			name:    "100 MB body, chunked",
			rawHead: head(withSecret, -1),
			rawBody: func() io.Reader { return chunked(io.LimitReader(repeat(' '), 100<<20)) },
			want:    []int{413}, result: "too_large", maxSent: 32 << 20, waitClose: true,
		},
		{
			name:    "slow-loris body",
			rawHead: head(withSecret, len(event)),
			rawBody: func() io.Reader { return &trickle{data: []byte(event), interval: 100 * time.Millisecond} },
			// read_body cuts the body: the relay answers 400 (the body
			// could not be read) or the server closes the connection.
			want: []int{400, 0}, result: "invalid", maxTook: hostileTimeout + 3*time.Second, waitClose: true,
		},
		{
			name:    "slow-loris body without the secret",
			rawHead: head("", len(event)),
			rawBody: func() io.Reader { return &trickle{data: []byte(event), interval: 100 * time.Millisecond} },
			want:    []int{401}, result: "unauthorized", early: true,
		},
		{
			name: "slow-loris header",
			rawBody: func() io.Reader {
				return &trickle{data: []byte(head(withSecret, len(event)) + event), interval: 100 * time.Millisecond}
			},
			// net/http answers 400 when the header times out half-read.
			want: []int{0, 400, 408}, maxTook: hostileTimeout + 3*time.Second, waitClose: true,
		},

		// Bodies that are not what the contract takes, or barely.
		{name: "100000 [", header: http.Header{"X-Secret": {hostileSecret}}, body: strings.Repeat("[", 100_000), want: []int{400}, result: "invalid"},
		{name: `100000 {"a":`, header: http.Header{"X-Secret": {hostileSecret}}, body: strings.Repeat(`{"a":`, 100_000), want: []int{400}, result: "invalid"},
		{
			name:    "max_body of [",
			rawHead: head(withSecret, 1<<20),
			rawBody: func() io.Reader { return io.LimitReader(repeat('['), 1<<20) },
			want:    []int{400}, result: "invalid", maxTook: 15 * time.Second,
		},
		{name: "valid JSON nested 100000 deep", header: http.Header{"X-Secret": {hostileSecret}}, body: deepValid, want: []int{200}, result: "accepted", accept: true},
		{name: "invalid UTF-8 inside JSON strings", header: http.Header{"X-Secret": {hostileSecret}}, body: badUTF8, want: []int{200}, result: "accepted", accept: true},
		{name: "invalid UTF-8 outside strings", header: http.Header{"X-Secret": {hostileSecret}}, body: event + "\xff", want: []int{400}, result: "invalid"},
		{name: "JSON array", header: http.Header{"X-Secret": {hostileSecret}}, body: "[" + event + "]", want: []int{400}, result: "invalid"},
		{name: "JSON string", header: http.Header{"X-Secret": {hostileSecret}}, body: `"event_id"`, want: []int{400}, result: "invalid"},
		{name: "JSON number", header: http.Header{"X-Secret": {hostileSecret}}, body: `1e999999`, want: []int{400}, result: "invalid"},
		{name: "JSON null", header: http.Header{"X-Secret": {hostileSecret}}, body: `null`, want: []int{400}, result: "invalid"},
		{name: "JSON true", header: http.Header{"X-Secret": {hostileSecret}}, body: ` true `, want: []int{400}, result: "invalid"},
		{name: "two JSON objects", header: http.Header{"X-Secret": {hostileSecret}}, body: event + event, want: []int{400}, result: "invalid"},
		{name: "empty body", header: http.Header{"X-Secret": {hostileSecret}}, want: []int{400}, result: "invalid"},
		{name: "lowercase post", rawHead: strings.Replace(head(withSecret, len(event)), "POST", "post", 1), rawBody: func() io.Reader { return strings.NewReader(event) }, want: []int{405}, result: "invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mark := len(target.requests())
			var r rawResult
			if tt.rawHead != "" || tt.rawBody != nil {
				var body io.Reader
				if tt.rawBody != nil {
					body = tt.rawBody()
				}
				r = rawRequest(t, hr.addr, tt.rawHead, body, 20*time.Second, tt.waitClose)
			} else {
				var body io.Reader
				if tt.body != "" {
					body = strings.NewReader(tt.body)
				}
				start := time.Now()
				resp := do(t, tester.Client, newRequest(t, http.MethodPost, hr.url+tt.query, body, tt.header))
				r = rawResult{status: resp.status, body: resp.body, took: time.Since(start)}
			}
			t.Logf("status %d after %s (%d bytes sent, connection closed: %v)", r.status, r.took.Round(time.Millisecond), r.sent, r.closed)
			ok := false
			for _, w := range tt.want {
				ok = ok || r.status == w
			}
			if !ok {
				t.Errorf("status %d (%q), want one of %v", r.status, r.body, tt.want)
			}
			maxTook := tt.maxTook
			switch {
			case tt.early:
				maxTook = hostileTimeout / 2
			case maxTook == 0:
				maxTook = 5 * time.Second
			}
			drained := tt.early && (r.took > maxTook || r.continued)
			if r.took > maxTook && !drained {
				t.Errorf("answered after %s, want at most %s", r.took, maxTook)
			}
			if tt.maxSent > 0 && r.sent > tt.maxSent {
				t.Errorf("the client could send %d bytes, want at most %d: the relay reads what it will refuse", r.sent, tt.maxSent)
			}
			if tt.waitClose && !r.closed {
				t.Error("the server did not close the connection")
			}
			if r.status == http.StatusUnauthorized && r.body != "unauthorized\n" {
				t.Errorf("401 body %q: want the same \"unauthorized\" whatever was wrong", r.body)
			}
			if tt.result != "" {
				counts[tt.result]++
			}
			var want [][]byte
			if tt.accept {
				hr.accepted++
				want = append(want, []byte(tt.body))
			}
			hr.checkNothingKept(t, mark, hr.barrier(t), want...)
			if drained {
				t.Errorf("%s (here: answered after %s, 100 Continue sent: %v)", bugDrainBeforeEarlyReply, r.took.Round(time.Millisecond), r.continued)
			}
		})
	}

	counts["accepted"] += hr.canaries
	for result, n := range counts {
		waitFor(t, 5*time.Second, "received_total{result="+result+"}", func() bool {
			was, _ := m0.get("caddy_webhook_relay_received_total", `relay="hostile",result="`+result+`"`)
			now, _ := scrape(t, tester.Client).get("caddy_webhook_relay_received_total", `relay="hostile",result="`+result+`"`)
			return now-was == float64(n)
		})
	}
}

// TestTargetsOnlyConfiguredURLs: no value of a payload or of a request
// (URL-looking fields, Host, X-Forwarded-*, an absolute-form request
// URI, a query) changes where a delivery goes. The configured target
// gets every event at its configured path and host; a target that
// redirects to the attacker is not followed; the attacker's server sees
// no connection at all.
func TestTargetsOnlyConfiguredURLs(t *testing.T) {
	const port = 9142
	attacker := newRecorder(t, http.StatusOK)
	target := newRecorder(t, http.StatusOK)
	redirector := newRecorder(t, http.StatusTemporaryRedirect)
	redirector.location = attacker.URL + "/stolen"
	tester := startCaddy(t, localConfig(port, "\tlog {\n\t\tlevel WARN\n\t}", fmt.Sprintf(`
	webhook_relay routing {
		auth_header X-Secret %s
		storage %s
		forward crm %s/hook?tenant=1
		forward redirector %s/r {
			max_attempts 2
			backoff 10ms 20ms
		}
	}`, hostileSecret, t.TempDir(), target.URL, redirector.URL)))
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	evil := attacker.Listener.Addr().String()
	evilURL := attacker.URL + "/steal"

	payload := func(id string) string {
		return fmt.Sprintf(`{"event_id":%q,"url":%q,"target":%q,"callback_url":%q,"webhook_url":%q,"redirect_uri":%q,`+
			`"forward":{"url":%q},"host":%q,"X-Webhook-Relay-Target":"attacker","headers":{"Host":%q},`+
			`"data":{"address_verification":{"status":"verified","url":%q}},"targets":[%q]}`,
			id, evilURL, "attacker", evilURL, evilURL, evilURL, evilURL, evil, evil, evilURL, evilURL)
	}
	forged := http.Header{
		"X-Secret":               {hostileSecret},
		"Content-Type":           {"application/json"},
		"X-Forwarded-Host":       {evil},
		"X-Forwarded-Proto":      {"http"},
		"X-Forwarded-Port":       {strings.Split(evil, ":")[1]},
		"X-Forwarded-For":        {"127.0.0.1"},
		"Forwarded":              {"for=127.0.0.1;host=" + evil + ";proto=http"},
		"X-Original-Url":         {evilURL},
		"X-Rewrite-Url":          {evilURL},
		"X-Http-Destination-Url": {evilURL},
		"Destination":            {evilURL},
		"Referer":                {evilURL},
		"Origin":                 {attacker.URL},
		"X-Webhook-Relay-Target": {"attacker"},
		"Idempotency-Key":        {"attacker-chosen"},
	}
	var sent []string
	send := func(name string, r rawResult) {
		t.Helper()
		if r.status != http.StatusOK {
			t.Fatalf("%s: status %d (%q), want 200", name, r.status, r.body)
		}
	}

	// Forged headers and a forged Host, through the client.
	body := payload("route-headers")
	req := newRequest(t, http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/?url=%s&target=attacker", port, evilURL), strings.NewReader(body), forged)
	req.Host = evil
	resp := do(t, tester.Client, req)
	send("forged headers", rawResult{status: resp.status, body: resp.body})
	sent = append(sent, body)

	// Raw: an absolute-form request URI naming the attacker, Host too.
	body = payload("route-absolute-uri")
	r := rawRequest(t, addr, fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nX-Secret: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
		evilURL, evil, hostileSecret, len(body)), strings.NewReader(body), 10*time.Second, false)
	send("absolute-form URI", r)
	sent = append(sent, body)

	// Raw: a path that looks like a URL, and two Host fields.
	body = payload("route-path")
	r = rawRequest(t, addr, fmt.Sprintf("POST /%s HTTP/1.1\r\nHost: %s\r\nX-Forwarded-Host: %s\r\nX-Secret: %s\r\nContent-Length: %d\r\n\r\n",
		evilURL, addr, evil, hostileSecret, len(body)), strings.NewReader(body), 10*time.Second, false)
	send("URL-looking path", r)
	sent = append(sent, body)

	byID := map[string]string{}
	for _, b := range sent {
		byID[okhiEventID(t, b)] = b
	}
	waitFor(t, 10*time.Second, "every event at the configured target", func() bool { return len(target.requests()) >= len(sent) })
	waitFor(t, 10*time.Second, "every event dead-lettered at the redirector", func() bool {
		s, ok := targetStats(t, tester.Client, "routing", "redirector")
		return ok && s.DeadLetters == int64(len(sent)) && s.Pending == 0
	})

	got := target.requests()
	if len(got) != len(sent) {
		t.Errorf("the target received %d requests, want %d", len(got), len(sent))
	}
	wantHost := target.Listener.Addr().String()
	for i, g := range got {
		if g.method != http.MethodPost || g.uri != "/hook?tenant=1" || g.host != wantHost {
			t.Errorf("delivery %d: %s %s to Host %s, want POST /hook?tenant=1 to Host %s", i, g.method, g.uri, g.host, wantHost)
		}
		want, ok := byID[g.header.Get("Idempotency-Key")]
		if !ok {
			t.Errorf("delivery %d: Idempotency-Key %q is not the id of an event sent", i, g.header.Get("Idempotency-Key"))
		} else if string(g.body) != want {
			t.Errorf("delivery %d: body %q, want %q", i, abbrev(g.body), abbrev([]byte(want)))
		}
		if tg := g.header.Get("X-Webhook-Relay-Target"); tg != "crm" {
			t.Errorf("delivery %d: X-Webhook-Relay-Target %q, want crm", i, tg)
		}
		for k := range forged {
			if k == "Content-Type" || k == "Idempotency-Key" || k == "X-Webhook-Relay-Target" {
				continue
			}
			if v := g.header.Get(k); v != "" {
				t.Errorf("delivery %d: inbound header %s forwarded (%q)", i, k, v)
			}
		}
	}
	redirected := redirector.requests()
	if len(redirected) != len(sent) {
		t.Errorf("the redirecting target got %d requests, want %d (one each, redirects are not retried)", len(redirected), len(sent))
	}
	for _, g := range redirected {
		if g.uri != "/r" {
			t.Errorf("the redirecting target was asked for %s, want /r", g.uri)
		}
	}
	dead, _ := allDeadLetters(t, tester.Client, "routing", "&target=redirector", 100)
	for _, d := range dead {
		if d.LastStatus != http.StatusTemporaryRedirect {
			t.Errorf("dead letter %s: last_status %d, want 307", d.EventID, d.LastStatus)
		}
	}
	if n := attacker.conns.Load(); n != 0 {
		t.Errorf("the attacker's server got %d connections (%d requests)", n, len(attacker.requests()))
	}
}
