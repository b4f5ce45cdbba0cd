package caddymodule

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

// The fuzz targets of the Caddy module. Seeds are in testdata/fuzz/<name>;
// CI runs each briefly:
//
//	go test -run '^$' -fuzz '^FuzzServeHTTP$' -fuzztime 20s ./caddymodule/
//	go test -run '^$' -fuzz '^FuzzUnmarshalCaddyfile$' -fuzztime 20s ./caddymodule/

const (
	fuzzHeader  = "X-Secret" // canonical form
	fuzzSecret  = "fuzz-secret-0123456789"
	fuzzRotated = "fuzz-rotated-secret"
	fuzzMaxBody = 4096
)

// Bits of FuzzServeHTTP's auth argument: the low two bits are how many
// times the auth header is sent (0 to 3); copy i carries the wrong value
// when bit 2+i is set, else a right one (the rotated secret when
// authRotated is set).
const authRotated = 0x20

// Bits of FuzzServeHTTP's opts argument.
const (
	optChunked = 1 << iota // no Content-Length
	optGeneric             // the relay with source generic
)

// FuzzServeHTTP sends random requests (method, auth header present 0 to 3
// times with right or random values, one more header of any name, body)
// straight to provisioned handlers, one per source, with memory stores and
// a target that takes everything. Every answer must be the one the
// contract gives for that request, in the contract's order of checks:
// 405, 401, 413, 400, else 200 (or 503 once max_pending is reached); a 200
// carries the contract's JSON with the event's derived id, and the same
// request sent again is a duplicate of the same id.
func FuzzServeHTTP(f *testing.F) {
	relays := provisionFuzzRelays(f)
	ack := regexp.MustCompile(`^\{"status":"(accepted|duplicate)","event_id":"([0-9a-f]{32})"\}\n$`)

	f.Fuzz(func(t *testing.T, method string, auth uint8, wrong, name, value string, body []byte, opts uint8) {
		h := relays[opts&optGeneric != 0]
		newReq := func() *http.Request {
			r := httptest.NewRequest(http.MethodPost, "http://127.0.0.1/", bytes.NewReader(body))
			r.Method = method
			right := fuzzSecret
			if auth&authRotated != 0 {
				right = fuzzRotated
			}
			for i := range int(auth & 3) {
				v := right
				if auth&(4<<i) != 0 {
					v = wrong
				}
				r.Header.Add(fuzzHeader, v)
			}
			if name != "" {
				// Any field, the auth header again too (in any case).
				r.Header.Add(name, value)
			}
			if opts&optChunked != 0 {
				r.ContentLength = -1
				r.TransferEncoding = []string{"chunked"}
			}
			return r
		}
		serve := func(r *http.Request) *httptest.ResponseRecorder {
			w := httptest.NewRecorder()
			if err := h.ServeHTTP(w, r, nil); err != nil {
				t.Fatalf("ServeHTTP returned an error: %v", err)
			}
			return w
		}

		r := newReq()
		w := serve(r)
		want := contractStatus(h, r, body)
		got := w.Code
		if got != want && (want != http.StatusOK || got != http.StatusServiceUnavailable) {
			t.Fatalf("status %d (%q), want %d", got, w.Body.String(), want)
		}
		switch got {
		case http.StatusMethodNotAllowed:
			if a := w.Header().Get("Allow"); a != http.MethodPost {
				t.Errorf("405 with Allow %q, want POST", a)
			}
		case http.StatusUnauthorized:
			if b := w.Body.String(); b != "unauthorized\n" {
				t.Errorf("401 body %q, want only \"unauthorized\"", b)
			}
		case http.StatusServiceUnavailable:
			if w.Header().Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
		case http.StatusOK:
			m := ack.FindStringSubmatch(w.Body.String())
			if m == nil {
				t.Fatalf("200 body %q is not the contract's ack", w.Body.String())
			}
			if ct := w.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("200 with Content-Type %q, want application/json", ct)
			}
			cfg := h.engine.Config()
			if id := cfg.EventID(body).String(); m[2] != id {
				t.Errorf("event_id %s, want %s (derived from the body)", m[2], id)
			}
			again := serve(newReq())
			if again.Code != http.StatusOK {
				t.Fatalf("sent again: status %d (%q), want 200", again.Code, again.Body.String())
			}
			if want := `{"status":"duplicate","event_id":"` + m[2] + "\"}\n"; again.Body.String() != want {
				t.Errorf("sent again: %q, want %q", again.Body.String(), want)
			}
		}
	})
}

// contractStatus is the status the contract gives r, whose body is body,
// when the relay can store it: checks run in the contract's order. JSON
// validity is judged by encoding/json, independently of the relay's gjson.
func contractStatus(h *Handler, r *http.Request, body []byte) int {
	switch {
	case r.Method != http.MethodPost:
		return http.StatusMethodNotAllowed
	case !authorized(r.Header[fuzzHeader]):
		return http.StatusUnauthorized
	case len(body) > fuzzMaxBody:
		return http.StatusRequestEntityTooLarge
	case h.Source != string(relay.SourceGeneric) && !isObject(body):
		return http.StatusBadRequest
	}
	return http.StatusOK
}

func authorized(values []string) bool {
	return len(values) == 1 && (values[0] == fuzzSecret || values[0] == fuzzRotated)
}

// isObject reports whether body is valid JSON with an object at the top.
func isObject(body []byte) bool {
	return json.Valid(body) && bytes.TrimLeft(body, " \t\r\n")[0] == '{'
}

// provisionFuzzRelays provisions two relays, by source (true: generic),
// the way Caddy does, in a context of their own with Caddy's logs
// discarded: no listener, no admin endpoint, so fuzz workers run side by
// side.
func provisionFuzzRelays(f *testing.F) map[bool]*Handler {
	f.Helper()
	target := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	f.Cleanup(target.Close)

	var cfg caddy.Config
	if err := json.Unmarshal([]byte(`{"logging":{"logs":{"default":{"writer":{"output":"discard"}}}}}`), &cfg); err != nil {
		f.Fatal(err)
	}
	ctx, err := caddy.ProvisionContext(&cfg)
	if err != nil {
		f.Fatalf("provisioning a Caddy context: %v", err)
	}
	newRelay := func(name, source string, keys []string) *Handler {
		h := &Handler{
			Name:       name,
			Source:     source,
			Auth:       &Auth{Header: "x-secret", Values: []string{fuzzSecret, fuzzRotated}},
			MaxBody:    fuzzMaxBody,
			MaxPending: 1000,
			// A short TTL, so that the keys of a long fuzzing run expire,
			// long enough for a request sent twice in a row to be a
			// duplicate on a busy machine.
			Dedupe:     &Dedupe{Keys: keys, Capacity: 1000, TTL: caddy.Duration(30 * time.Second)},
			StorageRaw: json.RawMessage(`{"backend":"memory"}`),
			Targets: []Target{{
				Name:        "sink",
				URL:         target.URL + "/hook",
				Timeout:     caddy.Duration(5 * time.Second),
				BackoffMin:  caddy.Duration(10 * time.Millisecond),
				BackoffMax:  caddy.Duration(100 * time.Millisecond),
				MaxAttempts: 3,
			}},
		}
		if err := h.Provision(ctx); err != nil {
			f.Fatalf("provisioning relay %s: %v", name, err)
		}
		f.Cleanup(func() {
			if err := h.Cleanup(); err != nil {
				f.Errorf("cleaning up relay %s: %v", name, err)
			}
		})
		if err := h.Validate(); err != nil {
			f.Fatal(err)
		}
		return h
	}
	relays := map[bool]*Handler{
		false: newRelay("fuzz-okhi", "", nil),
		true:  newRelay("fuzz-generic", string(relay.SourceGeneric), []string{"id"}),
	}
	app, err := ctx.App(appID)
	if err != nil {
		f.Fatal(err)
	}
	if err := app.(*App).Start(); err != nil {
		f.Fatalf("starting the webhook_relay app: %v", err)
	}
	return relays
}

// FuzzUnmarshalCaddyfile parses arbitrary text as the arguments and the
// block of a webhook_relay directive. The parser must not panic, and
// every error it returns names the file and line. A block it accepts
// must make a config the engine accepts too, or the mistake shows only
// when the config loads, without a line.
//
// The text is tokenized with caddyfile.Tokenize, as NewTestDispenser
// does, but without its {$ENV} substitution, which ends the process
// (log.Fatalf) on a tokenizer error; tokenizer errors are the lexer's,
// reported by Caddy with their line.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	lineRef := regexp.MustCompile(`Testfile:\d+`)
	f.Fuzz(func(t *testing.T, args, block string) {
		input := "webhook_relay" + args + " {\n" + block + "\n}\n"
		tokens, err := caddyfile.Tokenize([]byte(input), "Testfile")
		if err != nil {
			return
		}
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
			if !lineRef.MatchString(err.Error()) {
				t.Fatalf("error %q does not name the file and line (Testfile:<n>)", err)
			}
			return
		}
		checkParsed(t, &h)
	})
}

// checkParsed checks what a parsed webhook_relay block promises: an auth
// setting, at least one target, names and URLs the engine takes, and a
// config the engine accepts.
func checkParsed(t *testing.T, h *Handler) {
	t.Helper()
	if h.Auth == nil || h.Auth.Off == (h.Auth.Header != "") {
		t.Fatalf("accepted without exactly one of auth_header and auth off: %+v", h.Auth)
	}
	if h.Name != "" {
		if err := checkName("relay", h.Name); err != nil {
			t.Errorf("accepted relay name: %v", err)
		}
	}
	if h.Source != "" && h.Source != string(relay.SourceOkHi) && h.Source != string(relay.SourceGeneric) {
		t.Errorf("accepted source %q", h.Source)
	}
	if len(h.Targets) == 0 {
		t.Fatal("accepted without a forward block")
	}
	for _, tg := range h.Targets {
		if err := checkName("target", tg.Name); err != nil {
			t.Errorf("accepted target name: %v", err)
		}
		if err := relay.CheckURL(tg.URL); err != nil {
			t.Errorf("accepted target URL: %v", err)
		}
	}
	if _, err := engineConfig(h).WithDefaults(); err != nil {
		for _, tg := range h.Targets {
			for _, m := range tg.Match {
				if m.Path == "" {
					t.Fatal(bugEmptyMatchPath)
				}
			}
		}
		t.Fatalf("accepted a block the engine rejects: %v", err)
	}
	if h.Auth.Header != "" && !validFieldName(h.Auth.Header) {
		t.Fatal(bugAuthFieldName)
	}
	for _, tg := range h.Targets {
		for k, vs := range tg.Headers {
			if !validFieldName(k) {
				t.Fatal(bugForwardHeader)
			}
			for _, v := range vs {
				if !validFieldValue(v) {
					t.Fatal(bugForwardHeader)
				}
			}
		}
	}
}

// engineConfig is the engine's config of h, without resolving any
// placeholder (which may read files and the environment).
func engineConfig(h *Handler) relay.Config {
	cfg := relay.Config{Name: h.Name, Source: relay.Source(h.Source), MaxBody: h.MaxBody, MaxPending: h.MaxPending}
	if h.Dedupe != nil {
		cfg.Dedupe = relay.DedupeConfig{Keys: h.Dedupe.Keys, Capacity: h.Dedupe.Capacity, TTL: time.Duration(h.Dedupe.TTL), Off: h.Dedupe.Off}
	}
	for _, tg := range h.Targets {
		tc := relay.TargetConfig{
			Name: tg.Name, URL: tg.URL, Timeout: time.Duration(tg.Timeout), MaxAttempts: tg.MaxAttempts,
			BackoffMin: time.Duration(tg.BackoffMin), BackoffMax: time.Duration(tg.BackoffMax),
			MaxAge: time.Duration(tg.MaxAge), Concurrency: tg.Concurrency,
		}
		for _, m := range tg.Match {
			tc.Match = append(tc.Match, relay.Match{Path: m.Path, Values: m.Values})
		}
		cfg.Targets = append(cfg.Targets, tc)
	}
	return cfg
}

// validFieldName reports whether s is an HTTP field name (RFC 9110 token).
func validFieldName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
		if !ok {
			return false
		}
	}
	return true
}

// validFieldValue reports whether s can be sent as an HTTP field value:
// no control characters other than tab.
func validFieldValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// Bugs the fuzzer found in the Caddyfile adapter, fixed; each has a
// regression test below.
const (
	bugEmptyMatchPath = "regression: caddymodule/caddyfile.go accepted `match \"\" <value>` (an empty JSON path); " +
		"relay.Config.WithDefaults rejects it when the config loads, without file or line. " +
		"Fix: in unmarshalTarget, reject an empty path with d.Errf(\"match needs a JSON path ...\")."
	bugAuthFieldName = "regression: caddymodule/caddyfile.go accepted an auth_header field that is not an HTTP field name " +
		"(e.g. \"X Secret\"); no request can carry it, so every request gets 401. " +
		"Fix: check the field with httpguts.ValidHeaderFieldName in UnmarshalCaddyfile (and in relay.NewAuthenticator)."
	bugForwardHeader = "regression: caddymodule/caddyfile.go accepted a forward `header` whose field is not an HTTP field name " +
		"(e.g. \"\" or \"X A\") or whose value has control characters (a quoted newline); net/http refuses to send it, " +
		"so every attempt fails as a connection error, is retried max_attempts times and dead-lettered. " +
		"Fix: check fields with httpguts.ValidHeaderFieldName and values with httpguts.ValidHeaderFieldValue " +
		"in unmarshalTarget, and the resolved values again in Handler.relayConfig (placeholders are resolved there)."
)

// TestCaddyfileAcceptsOnlyLoadableBlocks shows the bugs the fuzzer finds:
// blocks the adapter accepts that cannot work once loaded.
func TestCaddyfileAcceptsOnlyLoadableBlocks(t *testing.T) {
	tests := []struct {
		name  string
		input string
		bug   string
	}{
		{
			name: "empty match path",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					match "" verified
				}
			}`,
			bug: bugEmptyMatchPath,
		},
		{
			name: "auth header field with a space",
			input: `webhook_relay {
				auth_header "X Secret" s3cret
				forward t1 http://127.0.0.1:9000/hook
			}`,
			bug: bugAuthFieldName,
		},
		{
			name: "empty forward header field",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					header "" value
				}
			}`,
			bug: bugForwardHeader,
		},
		{
			name: "forward header value with a newline",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					header X-Token "abc
def"
				}
			}`,
			bug: bugForwardHeader,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input)); err != nil {
				if !strings.Contains(err.Error(), "Testfile:") {
					t.Errorf("error %q does not name the file and line", err)
				}
				return // rejected, as it should be
			}
			t.Error(tt.bug)
		})
	}
}
