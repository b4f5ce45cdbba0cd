package caddymodule

import (
	"fmt"
	"html"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// consoleConfig mounts the console on /console beside a relay whose
// target audit dead-letters what it answers 400, and whose target slow
// keeps what it answers 503 pending for an hour.
func consoleConfig(port int, dir string, audit, slow *fakeTarget) string {
	return siteConfig(port, fmt.Sprintf(`
	handle /console {
		webhook_relay_console
	}
	handle {
		webhook_relay con {
			auth_header X-Secret %s
			storage %s
			forward audit %s
			forward slow %s {
				backoff 1h 1h
			}
		}
	}`, secret, dir, audit.URL, slow.URL))
}

var consoleTokenPattern = regexp.MustCompile(`name="token" value="([^"]+)"`)

// TestConsole drives the console over HTTP against a real Caddy: the
// figures, a dead letter's error and (escaped) body, replay, delete with
// its confirmation, pause and resume, and the refusal of forged POSTs.
func TestConsole(t *testing.T) {
	const port = 9181
	audit := newTarget(t, http.StatusBadRequest)
	slow := newTarget(t, http.StatusServiceUnavailable)
	tester := startCaddy(t, consoleConfig(port, t.TempDir(), audit, slow))
	c := tester.Client
	// The console's answers to POSTs are read, not followed.
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	t.Cleanup(noFollow.CloseIdleConnections)
	origin := fmt.Sprintf("http://localhost:%d", port)
	console := origin + "/console"
	get := func(t *testing.T, query string) response {
		t.Helper()
		r := do(t, c, newRequest(t, http.MethodGet, console+query, nil, nil))
		if r.status != http.StatusOK {
			t.Fatalf("GET %s: %d %s", query, r.status, r.body)
		}
		if ct := r.header.Get("Content-Type"); ct != "text/html; charset=utf-8" {
			t.Errorf("GET %s: Content-Type %q, want text/html", query, ct)
		}
		if csp := r.header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
			t.Errorf("GET %s: Content-Security-Policy %q, want default-src 'none'", query, csp)
		}
		return r
	}
	sameOrigin := http.Header{"Origin": {origin}, "Sec-Fetch-Site": {"same-origin"}, "Content-Type": {"application/x-www-form-urlencoded"}}
	postForm := func(t *testing.T, form url.Values, header http.Header) response {
		t.Helper()
		return do(t, noFollow, newRequest(t, http.MethodPost, console, strings.NewReader(form.Encode()), header))
	}
	// row is the overview's table row of target audit.
	row := func(t *testing.T) string {
		t.Helper()
		body := get(t, "").body
		_, after, ok := strings.Cut(body, `<tr id="target-con-audit">`)
		if !ok {
			t.Fatalf("overview has no row for con/audit:\n%s", body)
		}
		r, _, _ := strings.Cut(after, "</tr>")
		return r
	}

	script := "<script>alert(1)</script>"
	body := okhiEvent("con-1", script)
	id := ack(t, post(t, tester, origin+"/", body), "accepted")
	waitFor(t, 5*time.Second, "a dead letter at audit and an attempt at slow", func() bool {
		s, _ := targetStats(t, c, "con", "audit")
		return s.DeadLetters == 1 && len(slow.requests()) == 1
	})

	overview := get(t, "")
	m := consoleTokenPattern.FindStringSubmatch(overview.body)
	if m == nil {
		t.Fatalf("no token in the overview:\n%s", overview.body)
	}
	token := m[1]
	for _, want := range []string{`<meta name="viewport"`, "prefers-color-scheme: dark", `id="relay-con"`} {
		if !strings.Contains(overview.body, want) {
			t.Errorf("overview lacks %s", want)
		}
	}
	for _, bad := range []string{"<script", "<link", " src="} {
		if strings.Contains(overview.body, bad) {
			t.Errorf("overview holds %s: a script or something fetched:\n%s", bad, overview.body)
		}
	}
	if r := row(t); !strings.Contains(r, `class="bad">1</a>`) || !strings.Contains(r, `class="paused">no<`) {
		t.Errorf("audit's row shows no dead letter, or shows it paused: %s", r)
	}
	_, slowRow, _ := strings.Cut(overview.body, `<tr id="target-con-slow">`)
	slowRow, _, _ = strings.Cut(slowRow, "</tr>")
	if !strings.Contains(slowRow, ">1</a>") || !regexp.MustCompile(`<td data-label="Oldest pending" class="num">\d+s</td>`).MatchString(slowRow) {
		t.Errorf("slow's row shows no pending delivery or no oldest pending age: %s", slowRow)
	}

	t.Run("dead letters", func(t *testing.T) {
		page := get(t, "?view=dead&relay=con&target=audit").body
		for _, want := range []string{id, "400", "&lt;script&gt;alert(1)&lt;/script&gt;"} {
			if !strings.Contains(page, want) {
				t.Errorf("dead-letter page lacks %q:\n%s", want, page)
			}
		}
		if strings.Contains(page, script) {
			t.Errorf("dead-letter page holds the payload's script unescaped:\n%s", page)
		}
		if text := html.UnescapeString(page); !strings.Contains(text, "\n  \"event_id\": \"con-1\",\n") {
			t.Errorf("the body is not pretty-printed:\n%s", text)
		}
		if page := get(t, "?view=pending&relay=con&target=audit").body; !strings.Contains(page, "Nothing pending at audit") {
			t.Errorf("pending page of audit lists something:\n%s", page)
		}
		pending := get(t, "?view=pending&relay=con&target=slow").body
		for _, want := range []string{id, "503", "Next attempt", "&lt;script&gt;alert(1)&lt;/script&gt;"} {
			if !strings.Contains(pending, want) {
				t.Errorf("pending page of slow lacks %q:\n%s", want, pending)
			}
		}
		if strings.Contains(pending, script) {
			t.Errorf("pending page holds the payload's script unescaped:\n%s", pending)
		}
		ev := get(t, "?view=event&relay=con&id="+id).body
		for _, want := range []string{`<td class="state bad">dead</td>`, `<td class="state">pending</td>`, "&lt;script&gt;"} {
			if !strings.Contains(ev, want) {
				t.Errorf("event page lacks %s:\n%s", want, ev)
			}
		}
		if strings.Contains(ev, script) {
			t.Errorf("event page holds the payload's script unescaped:\n%s", ev)
		}
	})

	replay := url.Values{"token": {token}, "relay": {"con"}, "action": {"replay"}, "id": {id}, "target": {"audit"},
		"back": {"view=dead&relay=con"}}
	t.Run("forged posts", func(t *testing.T) {
		foreign := http.Header{"Origin": {"http://evil.example"}, "Content-Type": sameOrigin["Content-Type"]}
		crossSite := http.Header{"Sec-Fetch-Site": {"cross-site"}, "Content-Type": sameOrigin["Content-Type"]}
		noToken := url.Values{"relay": {"con"}, "action": {"replay"}, "id": {id}, "target": {"audit"}}
		badToken := url.Values{"token": {token + "x"}, "relay": {"con"}, "action": {"replay"}, "id": {id}, "target": {"audit"}}
		for name, tc := range map[string]struct {
			form   url.Values
			header http.Header
		}{
			"foreign origin": {replay, foreign},
			"cross site":     {replay, crossSite},
			"no token":       {noToken, sameOrigin},
			"wrong token":    {badToken, sameOrigin},
		} {
			if r := postForm(t, tc.form, tc.header); r.status != http.StatusForbidden {
				t.Errorf("%s: %d %s, want 403", name, r.status, r.body)
			}
		}
		if s, _ := targetStats(t, c, "con", "audit"); s.DeadLetters != 1 {
			t.Errorf("after refused posts: %d dead letters, want 1", s.DeadLetters)
		}
	})

	t.Run("replay", func(t *testing.T) {
		audit.status.Store(http.StatusOK)
		r := postForm(t, replay, sameOrigin)
		if r.status != http.StatusSeeOther || r.header.Get("Location") != "?relay=con&view=dead" {
			t.Fatalf("replay: %d Location %q %s, want 303 back to the list", r.status, r.header.Get("Location"), r.body)
		}
		audit.waitDelivered(t, 5*time.Second, id)
		waitFor(t, 5*time.Second, "the dead letter to leave the list", func() bool {
			return !strings.Contains(get(t, "?view=dead&relay=con").body, `id="entry-`+id)
		})
	})

	t.Run("pause and resume", func(t *testing.T) {
		for _, step := range []struct{ action, want string }{
			{"pause", `class="paused"><span class="warn">paused</span>`},
			{"resume", `class="paused">no<`},
		} {
			// back names another site: the answer still leads to the console.
			form := url.Values{"token": {token}, "relay": {"con"}, "action": {step.action}, "target": {"audit"},
				"back": {"https://evil.example/x"}}
			r := postForm(t, form, sameOrigin)
			if r.status != http.StatusSeeOther {
				t.Fatalf("%s: %d %s, want 303", step.action, r.status, r.body)
			}
			if loc := r.header.Get("Location"); !strings.HasPrefix(loc, "?") {
				t.Errorf("%s: Location %q, want a query of the console's own path", step.action, loc)
			}
			if r := row(t); !strings.Contains(r, step.want) {
				t.Errorf("after %s, audit's row: %s; want %s", step.action, r, step.want)
			}
		}
	})

	t.Run("paging and delete all with confirmation", func(t *testing.T) {
		audit.status.Store(http.StatusBadRequest)
		id2 := ack(t, post(t, tester, origin+"/", okhiEvent("con-2", "verified")), "accepted")
		id3 := ack(t, post(t, tester, origin+"/", okhiEvent("con-3", "verified")), "accepted")
		waitFor(t, 5*time.Second, "two new dead letters", func() bool {
			s, _ := targetStats(t, c, "con", "audit")
			return s.DeadLetters == 2
		})
		first := get(t, "?view=dead&relay=con&target=audit&limit=1").body
		m := regexp.MustCompile(`<a class="next" href="([^"]+)"`).FindStringSubmatch(first)
		if m == nil {
			t.Fatalf("first page of one has no next page link:\n%s", first)
		}
		second := get(t, html.UnescapeString(m[1])).body
		if strings.Contains(second, `class="next"`) {
			t.Errorf("second page of two has a next page link:\n%s", second)
		}
		for _, id := range []string{id2, id3} {
			// The entry, not the id: a cursor may hold an id.
			entry := `id="entry-` + id + `-audit"`
			if strings.Contains(first, entry) == strings.Contains(second, entry) {
				t.Errorf("event %s is on both pages or on neither", id)
			}
		}
		if page := get(t, "?view=confirm&relay=con&action=replay_all&target=audit").body; !strings.Contains(page, "Replay 2 dead letters at audit?") {
			t.Errorf("confirmation of replay all:\n%s", page)
		}

		// One picked in the list, deleted after its confirmation.
		pick := id2 + ":audit"
		if list := get(t, "?view=dead&relay=con").body; !strings.Contains(list, `value="`+pick+`" form="selection"`) {
			t.Errorf("dead-letter list has no checkbox for %s:\n%s", pick, list)
		}
		page := get(t, "?view=confirm&relay=con&action=delete_selected&sel="+pick).body
		if !strings.Contains(page, "Delete 1 dead letter, as selected?") || !strings.Contains(page, `name="sel" value="`+pick+`"`) {
			t.Fatalf("confirmation of a selection:\n%s", page)
		}
		form := url.Values{"token": {token}, "relay": {"con"}, "action": {"delete_selected"}, "sel": {pick}}
		if r := postForm(t, form, sameOrigin); r.status != http.StatusSeeOther {
			t.Fatalf("delete selected: %d %s, want 303", r.status, r.body)
		}
		bad := url.Values{"token": {token}, "relay": {"con"}, "action": {"delete_selected"}, "sel": {id3}}
		if r := postForm(t, bad, sameOrigin); r.status != http.StatusBadRequest {
			t.Errorf("delete selected without a target: %d, want 400", r.status)
		}
		if s, _ := targetStats(t, c, "con", "audit"); s.DeadLetters != 1 {
			t.Fatalf("after deleting one selected: %d dead letters, want 1", s.DeadLetters)
		}

		page = get(t, "?view=confirm&relay=con&action=delete_all&target=audit").body
		if !strings.Contains(page, "Delete 1 dead letter at audit?") || !strings.Contains(page, `method="post"`) {
			t.Fatalf("confirmation page:\n%s", page)
		}
		form = url.Values{"token": {token}, "relay": {"con"}, "action": {"delete_all"}, "target": {"audit"}}
		if r := postForm(t, form, sameOrigin); r.status != http.StatusSeeOther {
			t.Fatalf("delete all: %d %s, want 303", r.status, r.body)
		}
		if s, _ := targetStats(t, c, "con", "audit"); s.DeadLetters != 0 {
			t.Errorf("after delete all: %d dead letters, want 0", s.DeadLetters)
		}
		if page := get(t, "?view=dead&relay=con").body; strings.Contains(page, `id="entry-`) {
			t.Errorf("deleted dead letters still listed:\n%s", page)
		}
		if s, _ := targetStats(t, c, "con", "slow"); s.Pending != 3 {
			t.Errorf("slow: %d pending after deleting audit's dead letters, want 3", s.Pending)
		}
	})

	t.Run("errors", func(t *testing.T) {
		for query, want := range map[string]int{
			"?view=dead&relay=nope":                               http.StatusNotFound,
			"?view=event&relay=con&id=xx":                         http.StatusBadRequest,
			"?view=event&relay=con&id=" + strings.Repeat("0", 32): http.StatusNotFound,
			"?view=pending&relay=con&target=nope":                 http.StatusNotFound,
		} {
			if r := do(t, c, newRequest(t, http.MethodGet, console+query, nil, nil)); r.status != want {
				t.Errorf("GET %s: %d, want %d", query, r.status, want)
			}
		}
	})
}

// TestConsoleCaddyfile checks the directive takes no arguments and no
// block, and is ordered before respond.
func TestConsoleCaddyfile(t *testing.T) {
	adapt := func(site string) (string, error) {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(":8080 {\n"+site+"\n}\n"), nil)
		return string(out), err
	}
	out, err := adapt("respond ok\nwebhook_relay_console")
	if err != nil {
		t.Fatal(err)
	}
	console, respond := strings.Index(out, `"handler":"webhook_relay_console"`), strings.Index(out, `"handler":"static_response"`)
	if console < 0 || respond < 0 || console > respond {
		t.Errorf("console not ordered before respond: %s", out)
	}
	for _, bad := range []string{"webhook_relay_console extra", "webhook_relay_console {\n\tfoo\n}"} {
		if _, err := adapt(bad); err == nil {
			t.Errorf("%q adapted, want an error", bad)
		}
	}
}
