package caddymodule

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// The secrets of TestSecretsNeverLeak, and the wrong ones senders try.
const (
	leakSecret  = "S3CRET-XYZ-do-not-log"
	leakRotated = "R0TATED-abc-do-not-log"
	leakAPIKey  = "FWD-api-key-7Q2-for-targets-only"
)

var leakWrong = []string{
	leakSecret[:len(leakSecret)-1] + "G", // one byte changed
	"X" + leakSecret[1:],
	leakSecret + "-and-more",
	"wrong-guess-4242-do-not-log",
}

// leakNeedles are what must appear nowhere but where the test allows:
// the secrets, the wrong secrets, and parts of them (a log that shows a
// prefix or a suffix of a secret leaks too).
func leakNeedles() map[string]string {
	n := map[string]string{
		"the auth secret":          leakSecret,
		"the rotated secret":       leakRotated,
		"part of an auth secret":   "do-not-log",
		"the forward header value": leakAPIKey,
		"part of the forward key":  "7Q2-for-targets",
	}
	for i, w := range leakWrong {
		n[fmt.Sprintf("wrong secret %d", i)] = w
	}
	return n
}

// assertNoSecret fails t for every needle in haystack, except the allowed.
func assertNoSecret(t *testing.T, where, haystack string, allowed ...string) {
	t.Helper()
	for what, needle := range leakNeedles() {
		skip := false
		for _, a := range allowed {
			skip = skip || a == needle
		}
		if !skip && strings.Contains(haystack, needle) {
			i := strings.Index(haystack, needle)
			from, to := max(i-200, 0), min(i+len(needle)+100, len(haystack))
			t.Errorf("%s contains %s: ...%s...", where, what, haystack[from:to])
		}
	}
}

// TestSecretsNeverLeak runs a relay whose auth secret (and its rotated
// successor) and whose forwarded X-Api-Key come from the environment,
// with Caddy's log at DEBUG in a file; sends good requests, requests with
// wrong secrets (one byte off, twice, in the query string), events that
// a target refuses (dead letters) and that a target never takes (503
// until max_attempts: dead letters, replayed, dead again), and looks for
// the secrets everywhere: the log, the admin API (the relays, the dead
// letters, replay and delete answers, /config/), the metrics, the
// autosaved config, and what the targets received. The forward key may
// appear only in the X-Api-Key header of forwarded requests; the wrong
// secrets senders try are not ours, but they must not be logged either.
func TestSecretsNeverLeak(t *testing.T) {
	const port = 9143
	t.Setenv("WEBHOOK_RELAY_LEAK_AUTH", leakSecret)
	t.Setenv("WEBHOOK_RELAY_LEAK_ROTATED", leakRotated)
	t.Setenv("WEBHOOK_RELAY_LEAK_API_KEY", leakAPIKey)
	good := newRecorder(t, http.StatusOK)
	down := newRecorder(t, http.StatusServiceUnavailable)
	down.reply = "maintenance, come back later"
	reject := newRecorder(t, http.StatusBadRequest)
	reject.reply = "missing field verification_status"
	dir := t.TempDir()
	logFile := filepath.Join(dir, "caddy.log")
	globals := fmt.Sprintf("\tlog {\n\t\toutput file %s\n\t\tlevel DEBUG\n\t}", logFile)
	relayBlock := fmt.Sprintf(`
	webhook_relay leaks {
		auth_header X-Secret {env.WEBHOOK_RELAY_LEAK_AUTH} {env.WEBHOOK_RELAY_LEAK_ROTATED}
		storage %s
		forward good %s/hook {
			header X-Api-Key {env.WEBHOOK_RELAY_LEAK_API_KEY}
		}
		forward down %s/hook {
			header X-Api-Key {env.WEBHOOK_RELAY_LEAK_API_KEY}
			max_attempts 3
			backoff 10ms 20ms
		}
		forward reject %s/hook {
			header X-Api-Key {env.WEBHOOK_RELAY_LEAK_API_KEY}
		}
	}`, filepath.Join(dir, "store"), good.URL, down.URL, reject.URL)
	tester := startCaddy(t, localConfig(port, globals, relayBlock))
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	var admins []string // every admin answer
	adminGet := func(path string) {
		t.Helper()
		r := admin(t, tester.Client, http.MethodGet, path, "", nil)
		if r.status != http.StatusOK {
			t.Fatalf("GET %s: %d: %s", path, r.status, r.body)
		}
		admins = append(admins, path+": "+r.body)
	}

	send := func(header http.Header, query, body string, want int) {
		t.Helper()
		h := http.Header{"Content-Type": {"application/json"}}
		for k, v := range header {
			h[k] = v
		}
		r := do(t, tester.Client, newRequest(t, http.MethodPost, url+query, strings.NewReader(body), h))
		if r.status != want {
			t.Fatalf("status %d (%q), want %d", r.status, r.body, want)
		}
		assertNoSecret(t, "an answer to a sender", r.body)
	}
	const events = 4
	for i := range events {
		secret := leakSecret
		if i%2 == 1 {
			secret = leakRotated
		}
		send(http.Header{"X-Secret": {secret}}, "", okhiEvent(fmt.Sprintf("leak-%d", i), "verified"), http.StatusOK)
	}
	bad := okhiEvent("leak-bad", "verified")
	for _, w := range leakWrong {
		send(http.Header{"X-Secret": {w}}, "", bad, http.StatusUnauthorized)
	}
	send(http.Header{"X-Secret": {leakSecret, leakSecret}}, "", bad, http.StatusUnauthorized)
	send(http.Header{"X-Secret": {leakWrong[0], leakSecret}}, "", bad, http.StatusUnauthorized)
	send(nil, "?X-Secret="+leakWrong[0], bad, http.StatusUnauthorized)
	send(http.Header{"Authorization": {"Bearer " + leakWrong[1]}}, "", bad, http.StatusUnauthorized)

	deadAt := func(target string, n int64) func() bool {
		return func() bool {
			s, ok := targetStats(t, tester.Client, "leaks", target)
			return ok && s.DeadLetters == n && s.Pending == 0
		}
	}
	waitFor(t, 10*time.Second, "every event delivered to good", func() bool {
		s, ok := targetStats(t, tester.Client, "leaks", "good")
		return ok && s.Pending == 0 && len(good.requests()) == events
	})
	waitFor(t, 10*time.Second, "every event dead at down", deadAt("down", events))
	waitFor(t, 10*time.Second, "every event dead at reject", deadAt("reject", events))

	adminGet("/webhook_relay/")
	adminGet("/webhook_relay/leaks/dead_letters")
	adminGet("/webhook_relay/leaks/dead_letters?target=down&limit=1")
	r := admin(t, tester.Client, http.MethodPost, "/webhook_relay/leaks/dead_letters/replay", `{"target":"down"}`, nil)
	admins = append(admins, "replay: "+r.body)
	waitFor(t, 10*time.Second, "the replayed events dead again at down", deadAt("down", events))
	dl, _ := allDeadLetters(t, tester.Client, "leaks", "&target=reject", 100)
	if len(dl) == 0 {
		t.Fatal("no dead letter at reject")
	}
	r = admin(t, tester.Client, http.MethodDelete, "/webhook_relay/leaks/dead_letters/"+dl[0].EventID, "", nil)
	admins = append(admins, "delete: "+r.body)
	adminGet("/webhook_relay/leaks/dead_letters")
	adminGet("/config/")
	admins = append(admins, "/metrics: "+admin(t, tester.Client, http.MethodGet, "/metrics", "", nil).body)
	if !strings.Contains(strings.Join(admins, "\n"), "503 Service Unavailable: maintenance") {
		t.Error("the dead letters do not show the targets' answers: the search below would prove little")
	}

	t.Run("access log with the auth header filtered out", func(t *testing.T) {
		accessLog := filepath.Join(dir, "access-filtered.log")
		loadConfig(t, tester, localConfig(port, globals, fmt.Sprintf(`
	log {
		output file %s
		format filter {
			request>headers>X-Secret delete
		}
	}`, accessLog)+relayBlock))
		send(http.Header{"X-Secret": {leakSecret}}, "", okhiEvent("leak-filtered", "verified"), http.StatusOK)
		send(http.Header{"X-Secret": {leakWrong[0]}}, "", bad, http.StatusUnauthorized)
		b, err := os.ReadFile(accessLog)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), `"status":401`) {
			t.Fatalf("the access log has no entry for the 401: %s", b)
		}
		assertNoSecret(t, "the filtered access log", string(b))
	})

	t.Run("access log as Caddy writes it by default", func(t *testing.T) {
		accessLog := filepath.Join(dir, "access-default.log")
		loadConfig(t, tester, localConfig(port, globals, fmt.Sprintf(`
	log {
		output file %s
	}`, accessLog)+relayBlock))
		send(http.Header{"X-Secret": {leakSecret}}, "", okhiEvent("leak-default", "verified"), http.StatusOK)
		b, err := os.ReadFile(accessLog)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), leakSecret) {
			// Caddy's own access log, not the relay, writes request headers
			// other than Authorization/Cookie; README tells users to add
			// the filter that the subtest above shows to work.
			t.Log("as README warns: Caddy's default access log holds the auth_header value unless filtered")
		}
	})

	// Close the log, then search it. A later config load, by another test
	// or the cleanup, finds the empty config in place and does nothing.
	stopCaddy(t)
	b, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	log := string(b)
	for _, want := range []string{`"level":"debug"`, "delivery failed, will retry", "delivery dead-lettered", "relay open"} {
		if !strings.Contains(log, want) {
			t.Errorf("the DEBUG log has no %q: the search below would prove little", want)
		}
	}
	assertNoSecret(t, "Caddy's log", log)
	for _, a := range admins {
		assertNoSecret(t, "the admin API", a)
	}
	if autosave, err := os.ReadFile(caddy.ConfigAutosavePath); err == nil {
		assertNoSecret(t, "the autosaved config "+caddy.ConfigAutosavePath, string(autosave))
	}

	for name, rec := range map[string]*recorder{"good": good, "down": down, "reject": reject} {
		reqs := rec.requests()
		if len(reqs) == 0 {
			t.Errorf("target %s received nothing", name)
		}
		for _, req := range reqs {
			if got := req.header.Get("X-Api-Key"); got != leakAPIKey {
				t.Errorf("target %s: X-Api-Key %q, want the configured key", name, got)
			}
			h := req.header.Clone()
			h.Del("X-Api-Key")
			var sb strings.Builder
			if err := h.Write(&sb); err != nil {
				t.Fatal(err)
			}
			assertNoSecret(t, "the headers forwarded to "+name, sb.String())
			assertNoSecret(t, "the body forwarded to "+name, string(req.body))
		}
	}
}
