package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"html"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

// browserConsoleConfig mounts the console on /console beside relay ops:
// target audit dead-letters what it answers 400, crm takes everything,
// and slow keeps what it answers 503 pending for an hour.
func browserConsoleConfig(port int, dir string, audit, crm, slow *fakeTarget) string {
	return siteConfig(port, fmt.Sprintf(`
	handle /console {
		webhook_relay_console
	}
	handle {
		webhook_relay ops {
			auth_header X-Secret %s
			storage %s
			forward audit %s
			forward crm %s
			forward slow %s {
				backoff 1h 1h
			}
		}
	}`, secret, dir, audit.URL, crm.URL, slow.URL))
}

// chromiumPath finds the browser, or skips the test where none is
// installed; CI installs one, so there a missing browser fails.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("no chromium, chromium-browser or google-chrome in PATH: CI must install Debian's chromium package")
	}
	t.Skip("needs Debian's chromium package: no chromium, chromium-browser or google-chrome in PATH")
	return ""
}

// browser is one tab of a headless Chromium, with what its pages wrote
// to the console.
type browser struct {
	ctx context.Context

	mu       sync.Mutex
	messages []chromedp.ConsoleMessage
}

// browserStep bounds one action: a selector that never matches fails
// its step rather than waiting for the browser's end.
const browserStep = 20 * time.Second

func startBrowser(t *testing.T, path string) *browser {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.DisableGPU,
		chromedp.WindowSize(1280, 900),
	)
	if os.Geteuid() == 0 {
		// Chromium refuses to run as root with its sandbox.
		opts = append(opts, chromedp.NoSandbox)
	}
	// The browser lives at most this long: a hung Chromium ends the test,
	// not the CI job.
	base, cancelBase := context.WithTimeout(context.Background(), 3*time.Minute)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(base, opts...)
	ctx, cancelCtx := chromedp.NewContext(allocCtx)
	b := &browser{ctx: ctx}
	if err := chromedp.Do(ctx); err != nil {
		cancelCtx()
		cancelAlloc()
		cancelBase()
		t.Fatalf("starting %s: %v", path, err)
	}
	messages := chromedp.Console(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m, err := range messages {
			if err != nil {
				return
			}
			b.mu.Lock()
			b.messages = append(b.messages, m)
			b.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		stop, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := chromedp.Cancel(stop); err != nil {
			t.Errorf("closing the browser: %v", err)
		}
		cancelCtx()
		// Kills whatever is left of the browser and waits for it.
		cancelAlloc()
		cancelBase()
		<-done
	})
	return b
}

// do runs steps within browserStep.
func (b *browser) do(t *testing.T, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserStep)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// browserRun runs one action that returns a value, within browserStep.
func browserRun[T any](t *testing.T, b *browser, what string, a chromedp.Action[T]) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserStep)
	defer cancel()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return v
}

// eval evaluates a JavaScript expression in the page.
func eval[T any](t *testing.T, b *browser, expr string) T {
	t.Helper()
	return browserRun(t, b, "evaluating "+expr, chromedp.Evaluate[T](expr))
}

// open loads a page as a person would: its address, no header added.
func (b *browser) open(t *testing.T, url string) {
	t.Helper()
	resp := browserRun(t, b, "opening "+url, chromedp.NavigateResponse(url))
	if resp.Status != http.StatusOK {
		t.Fatalf("opening %s: %d %s", url, resp.Status, resp.StatusText)
	}
}

// click clicks the element that sel finds, and waits for the page the
// click leads to.
func (b *browser) click(t *testing.T, sel string) *network.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, browserStep)
	defer cancel()
	resp, err := chromedp.RunResponse(ctx, chromedp.Click(chromedp.CSS(sel)))
	if err != nil {
		t.Fatalf("clicking %s: %v", sel, err)
	}
	return resp
}

// scheme sets the color scheme the page's media queries see.
func scheme(value string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := cdp.Call(ctx, t, emulation.SetEmulatedMedia, emulation.SetEmulatedMediaParams{
			Features: []*emulation.MediaFeature{{Name: "prefers-color-scheme", Value: value}},
		})
		return err
	})
}

// desktop is a 1280×900 window in the light scheme, the layout every
// step but the phone screenshots runs in.
func (b *browser) desktop(t *testing.T) {
	t.Helper()
	b.do(t, "emulating a desktop", chromedp.EmulateViewport(1280, 900), scheme("light"))
}

// widthReport is what the page says of its width.
type widthReport struct {
	ScrollWidth int      `json:"scrollWidth"`
	ClientWidth int      `json:"clientWidth"`
	Wide        []string `json:"wide"`
}

// widthJS measures the document and names the elements that reach past
// the viewport (those inside a scrolling box among them).
const widthJS = `(() => {
	const w = document.documentElement.clientWidth, wide = [];
	for (const el of document.body.querySelectorAll('*')) {
		const r = el.getBoundingClientRect();
		if (r.right > w + 1) {
			wide.push(el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
				(el.className ? '.' + el.className : '') + ' right=' + Math.round(r.right));
		}
	}
	return {scrollWidth: document.documentElement.scrollWidth, clientWidth: w, wide: wide.slice(0, 15)};
})()`

// screenshots saves the page at url as <name>-desktop.png (1280 px,
// light) and <name>-390-dark.png (a 390 px phone in the dark scheme),
// checking that each scheme took and that the phone does not scroll
// sideways.
func (b *browser) screenshots(t *testing.T, dir, name, url string) {
	t.Helper()
	background := func() string {
		return eval[string](t, b, `getComputedStyle(document.body).backgroundColor`)
	}
	save := func(file string) {
		t.Helper()
		png := browserRun(t, b, "screenshot "+file, chromedp.FullScreenshot(100))
		if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
			t.Fatalf("screenshot %s is not a PNG", file)
		}
		path := filepath.Join(dir, file)
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatalf("saving the screenshot: %v", err)
		}
		t.Logf("screenshot %s (%d bytes)", path, len(png))
	}

	b.desktop(t)
	b.open(t, url)
	if bg := background(); bg != "rgb(255, 255, 255)" {
		t.Errorf("%s at desktop width, light: body background %s, want white", name, bg)
	}
	save(name + "-desktop.png")

	b.do(t, "emulating a phone in the dark", chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile, chromedp.EmulateScale(2)), scheme("dark"))
	defer b.desktop(t)
	b.open(t, url)
	if bg := background(); bg != "rgb(13, 17, 23)" {
		t.Errorf("%s at 390 px, dark: body background %s, want the dark scheme's rgb(13, 17, 23)", name, bg)
	}
	w := eval[widthReport](t, b, widthJS)
	if w.ClientWidth != 390 {
		t.Errorf("%s at 390 px: the layout viewport is %d px wide, want 390 (viewport meta ignored?)", name, w.ClientWidth)
	}
	if w.ScrollWidth > 390+1 {
		t.Errorf("%s at 390 px scrolls sideways: the document is %d px wide; elements past the edge: %v", name, w.ScrollWidth, w.Wide)
	}
	save(name + "-390-dark.png")
}

// rowsJS reads the overview's target rows of relay ops, each cell
// under its column's heading.
const rowsJS = `(() => {
	const rows = {};
	for (const tr of document.querySelectorAll('tr[id^="target-ops-"]')) {
		const heads = Array.from(tr.closest('table').tHead.rows[0].cells, th => th.innerText.trim());
		rows[tr.id.slice('target-ops-'.length)] = Object.fromEntries(Array.from(tr.cells, (td, i) => [heads[i], td.innerText.trim()]));
	}
	return rows;
})()`

// overviewRows opens the overview and reads its rows of relay ops by
// target, then by column.
func overviewRows(t *testing.T, b *browser, console string) map[string]map[string]string {
	t.Helper()
	b.open(t, console)
	return eval[map[string]map[string]string](t, b, rowsJS)
}

// adminRelay is the admin API's overview of one relay.
func adminRelay(t *testing.T, c *http.Client, name string) (pendingEvents int64, targets map[string]relay.TargetStats) {
	t.Helper()
	var o overview
	if r := admin(t, c, http.MethodGet, "/webhook_relay/", "", &o); r.status != http.StatusOK {
		t.Fatalf("GET /webhook_relay/: %d: %s", r.status, r.body)
	}
	for _, rl := range o.Relays {
		if rl.Name == name {
			targets = map[string]relay.TargetStats{}
			for _, ts := range rl.Targets {
				targets[ts.Name] = ts
			}
			return rl.PendingEvents, targets
		}
	}
	t.Fatalf("the admin API has no relay %s: %+v", name, o)
	return 0, nil
}

var ageCell = regexp.MustCompile(`^(\d+h)?(\d+m)?\d+s$`)

// checkOverview reads the overview in the browser and compares every
// figure with what the admin API says after it.
func checkOverview(t *testing.T, b *browser, c *http.Client, console string) {
	t.Helper()
	rows := overviewRows(t, b, console)
	summary := eval[string](t, b, `document.querySelector('#relay-ops + p').innerText`)
	pendingEvents, targets := adminRelay(t, c, "ops")

	if want := regexp.MustCompile(fmt.Sprintf(`^%d events? pending · store up`, pendingEvents)); !want.MatchString(summary) {
		t.Errorf("overview says %q, the admin API %d events pending and the store up", summary, pendingEvents)
	}
	if len(rows) != len(targets) {
		t.Errorf("overview has %d target rows, the admin API %d targets: %v", len(rows), len(targets), rows)
	}
	yesNo := func(v bool, yes string) string {
		if v {
			return yes
		}
		return "no"
	}
	for name, got := range rows {
		ts, ok := targets[name]
		if !ok {
			t.Errorf("overview row %s: no such target in the admin API", name)
			continue
		}
		for column, want := range map[string]string{
			"Target":       name,
			"Pending":      strconv.FormatInt(ts.Pending, 10),
			"Held":         yesNo(ts.Held, "held"),
			"Paused":       yesNo(ts.Paused, "paused"),
			"Dead letters": strconv.FormatInt(ts.DeadLetters, 10),
		} {
			if got[column] != want {
				t.Errorf("overview row %s: %s %q, the admin API %q", name, column, got[column], want)
			}
		}
		if age := got["Oldest pending"]; (ts.Pending > 0 && !ageCell.MatchString(age)) || (ts.Pending == 0 && age != "—") {
			t.Errorf("overview row %s: oldest pending %q with %d pending", name, age, ts.Pending)
		}
		button := "Pause"
		if ts.Paused {
			button = "Resume"
		}
		if actions := got["Actions"]; !strings.HasPrefix(actions, button) || strings.Contains(actions, "Replay all") != (ts.DeadLetters > 0) {
			t.Errorf("overview row %s: actions %q, want %s, and Replay all only with dead letters (%d)", name, actions, button, ts.DeadLetters)
		}
	}
}

// checkCharts reads the overview's charts as drawn: three, each an SVG
// of some size, and their legends tell the figures of the scenario so
// far: one event accepted, delivered at crm, dead at audit, pending at
// slow after its first attempt.
func checkCharts(t *testing.T, b *browser) {
	t.Helper()
	type drawn struct {
		Title  string
		Width  float64
		Marks  int
		Legend []string
	}
	charts := eval[[]drawn](t, b, `[...document.querySelectorAll('#relay-ops ~ .charts figure.chart')].map(f => ({
		Title: f.querySelector('figcaption').innerText,
		Width: f.querySelector('svg') ? f.querySelector('svg').getBoundingClientRect().width : 0,
		Marks: f.querySelectorAll('svg rect, svg polyline').length,
		Legend: [...f.querySelectorAll('.legend li')].map(li => li.innerText.trim()),
	}))`)
	if len(charts) != 3 {
		t.Fatalf("overview shows %d charts, want 3: %+v", len(charts), charts)
	}
	for i, want := range [][]string{
		{"accepted: 1 in the hour"},
		{"dead_lettered: 1 in the hour", "delivered: 1 in the hour", "retried: 1 in the hour"},
		{"audit: 0 now", "crm: 0 now", "slow: 1 now"},
	} {
		c := charts[i]
		if c.Width < 200 || c.Marks == 0 || !slices.Equal(c.Legend, want) {
			t.Errorf("chart %q: %.0f px wide with %d marks, legend %q; want a drawn chart with legend %q", c.Title, c.Width, c.Marks, c.Legend, want)
		}
	}
}

// entryJS reads a list entry: its fields by their labels, and its body.
const entryJS = `((id) => {
	const e = document.getElementById(id);
	if (!e) return null;
	const out = {};
	for (const dt of e.querySelectorAll('dt')) out[dt.innerText.trim()] = dt.nextElementSibling.innerText.trim();
	return out;
})(%q)`

// TestConsoleBrowser drives the console in a real headless Chromium
// against a real Caddy, as a person would: the overview's figures, a
// dead letter's error and body, replay by clicking, pause and resume, a
// payload's markup shown as text, a POST from another site refused, and
// screenshots at desktop width and on a phone in the dark.
func TestConsoleBrowser(t *testing.T) {
	const port = 9182
	path := chromiumPath(t)
	shots := t.ArtifactDir()
	audit := newTarget(t, http.StatusBadRequest)
	crm := newTarget(t, http.StatusOK)
	slow := newTarget(t, http.StatusServiceUnavailable)
	tester := startCaddy(t, browserConsoleConfig(port, t.TempDir(), audit, crm, slow))
	c := tester.Client
	b := startBrowser(t, path)
	origin := fmt.Sprintf("http://localhost:%d", port)
	console := origin + "/console"

	payload := `<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">`
	body := okhiEvent("browser-1", payload)
	id := ack(t, post(t, tester, origin+"/", body), "accepted")
	waitFor(t, 10*time.Second, "a dead letter at audit, a delivery at crm, an attempt at slow", func() bool {
		_, ts := adminRelay(t, c, "ops")
		return ts["audit"].DeadLetters == 1 && ts["crm"].Pending == 0 && crm.delivered()[id] == 1 &&
			ts["slow"].Pending == 1 && len(slow.requests()) == 1
	})
	b.desktop(t)

	if !t.Run("overview", func(t *testing.T) {
		checkOverview(t, b, c, console)
		checkCharts(t, b)
		b.screenshots(t, shots, "overview", console)
		b.checkConsole(t, nil)
	}) {
		return
	}

	entry := "entry-" + id + "-audit"
	deadPage := console + "?relay=ops&target=audit&view=dead"
	if !t.Run("dead letter", func(t *testing.T) {
		b.open(t, console)
		resp := b.click(t, `[id="target-ops-audit"] a.bad`)
		if resp.Status != http.StatusOK || resp.URL != deadPage {
			t.Fatalf("the dead-letter count led to %s: %d, want %s", resp.URL, resp.Status, deadPage)
		}
		all, _ := allDeadLetters(t, c, "ops", "&target=audit", 50)
		if len(all) != 1 || all[0].EventID != id {
			t.Fatalf("admin API dead letters at audit: %+v, want event %s", all, id)
		}
		dl := all[0]
		fields := eval[map[string]string](t, b, fmt.Sprintf(entryJS, entry))
		if fields == nil {
			t.Fatalf("the dead-letter page has no entry %s", entry)
		}
		for label, want := range map[string]string{
			"Event": id, "Target": "audit", "Last error": dl.LastError,
			"Last status": "400", "Attempts": strconv.Itoa(dl.Attempts),
		} {
			if fields[label] != want {
				t.Errorf("dead letter's %s: %q, the admin API %q", label, fields[label], want)
			}
		}
		if !strings.Contains(fields["Last error"], "400") {
			t.Errorf("dead letter's last error %q does not name the 400", fields["Last error"])
		}

		// The payload's markup is text in the body's <pre>, and none of it
		// became an element or ran.
		shown := browserRun(t, b, "reading the body", chromedp.Text(chromedp.CSS(`[id="`+entry+`"] pre.body`)))
		var pretty bytes.Buffer
		if err := json.Indent(&pretty, []byte(dl.Body), "", "  "); err != nil {
			t.Fatalf("the admin API's body %q: %v", dl.Body, err)
		}
		if strings.TrimSpace(shown) != pretty.String() {
			t.Errorf("body shown:\n%s\nwant the admin API's body, indented:\n%s", shown, pretty.String())
		}
		for _, want := range []string{"<script>window.__pwned=1</script>", `<img src=x onerror=\"window.__pwned=2\">`} {
			if !strings.Contains(shown, want) {
				t.Errorf("body shown lacks %s as text:\n%s", want, shown)
			}
		}
		if n := eval[int](t, b, `document.querySelectorAll('script, img, iframe, object, embed').length`); n != 0 {
			t.Errorf("the page holds %d script, img or embedded elements: the payload became markup", n)
		}
		if !eval[bool](t, b, `typeof window.__pwned === "undefined"`) {
			t.Errorf("window.__pwned is set: the payload ran")
		}
		b.screenshots(t, shots, "dead-letter", deadPage)
		b.checkConsole(t, nil)
	}) {
		return
	}

	if !t.Run("replay by clicking", func(t *testing.T) {
		audit.status.Store(http.StatusOK)
		b.open(t, deadPage)
		resp := b.click(t, `[id="`+entry+`"] button[value="replay"]`)
		if resp.Status != http.StatusOK || !strings.Contains(resp.URL, "view=dead") {
			t.Fatalf("replay led to %s: %d, want back to the dead-letter list", resp.URL, resp.Status)
		}
		audit.waitDelivered(t, 10*time.Second, id)
		waitFor(t, 10*time.Second, "the dead letter to leave the list", func() bool {
			b.open(t, deadPage)
			return eval[bool](t, b, fmt.Sprintf(`document.getElementById(%q) === null`, entry))
		})
		if text := browserRun(t, b, "reading the list", chromedp.Text(chromedp.CSS("p.muted"))); text != "No dead letters at audit." {
			t.Errorf("the emptied list says %q", text)
		}
		if s, _ := targetStats(t, c, "ops", "audit"); s.DeadLetters != 0 || s.Pending != 0 {
			t.Errorf("audit after the replay: %d dead letters, %d pending, want none", s.DeadLetters, s.Pending)
		}
		b.checkConsole(t, nil)
	}) {
		return
	}

	if !t.Run("pause and resume by clicking", func(t *testing.T) {
		row := `[id="target-ops-crm"]`
		b.open(t, console)
		if resp := b.click(t, row+` button[value="pause"]`); resp.Status != http.StatusOK {
			t.Fatalf("pause led to %s: %d", resp.URL, resp.Status)
		}
		if s, _ := targetStats(t, c, "ops", "crm"); !s.Paused {
			t.Fatalf("crm is not paused after clicking Pause: %+v", s)
		}
		before := len(crm.requests())
		id2 := ack(t, post(t, tester, origin+"/", okhiEvent("browser-2", "verified")), "accepted")
		// audit, not paused, gets the event: the relay has dispatched it.
		audit.waitDelivered(t, 10*time.Second, id2)
		waitFor(t, 10*time.Second, "the overview to show crm paused with 1 pending", func() bool {
			row := overviewRows(t, b, console)["crm"]
			return row["Pending"] == "1" && row["Paused"] == "paused" && strings.HasPrefix(row["Actions"], "Resume")
		})
		checkOverview(t, b, c, console)
		if got := crm.requests(); len(got) != before {
			t.Fatalf("paused crm got %d requests, want none", len(got)-before)
		}

		if resp := b.click(t, row+` button[value="resume"]`); resp.Status != http.StatusOK {
			t.Fatalf("resume led to %s: %d", resp.URL, resp.Status)
		}
		crm.waitDelivered(t, 10*time.Second, id2)
		waitFor(t, 10*time.Second, "the overview to show crm running with nothing pending", func() bool {
			row := overviewRows(t, b, console)["crm"]
			return row["Pending"] == "0" && row["Paused"] == "no" && strings.HasPrefix(row["Actions"], "Pause")
		})
		checkOverview(t, b, c, console)
		b.checkConsole(t, nil)
	}) {
		return
	}

	t.Run("post from another site", func(t *testing.T) {
		b.open(t, console)
		// Even the page's own token does not help another site.
		token := eval[string](t, b, `document.querySelector('input[name="token"]').value`)
		evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			fmt.Fprintf(w, `<!doctype html><title>other site</title>
<form method="post" action="%s"><input type="hidden" name="token" value="%s">
<input type="hidden" name="relay" value="ops"><input type="hidden" name="target" value="crm">
<button id="go" name="action" value="pause">Win a prize</button></form>`, html.EscapeString(console), html.EscapeString(token))
		}))
		t.Cleanup(evil.Close)
		b.open(t, evil.URL)
		resp := b.click(t, "#go")
		if resp.Status != http.StatusForbidden {
			t.Errorf("the console answered the other site's POST with %d, want 403", resp.Status)
		}
		if h1 := browserRun(t, b, "reading the answer", chromedp.Text(chromedp.CSS("h1"))); h1 != "Forbidden" {
			t.Errorf("the answer's heading is %q, want Forbidden", h1)
		}
		if msg := browserRun(t, b, "reading the answer", chromedp.Text(chromedp.CSS("p.bad"))); !strings.Contains(msg, "another site") {
			t.Errorf("the answer says %q, want a refusal naming another site", msg)
		}
		if s, _ := targetStats(t, c, "ops", "crm"); s.Paused {
			t.Errorf("crm is paused by another site's POST")
		}
		// The browser notes the 403 of the document it was sent to.
		b.checkConsole(t, func(m chromedp.ConsoleMessage) bool {
			return m.Source == "network" && m.URL == console && strings.Contains(m.Text, "403")
		})
	})
}

// checkConsole fails on what the pages wrote to the browser's console
// since the last check, an exception or an error, except what expected
// allows. A page of the console has no script and fetches nothing, so
// its console stays empty.
func (b *browser) checkConsole(t *testing.T, expected func(chromedp.ConsoleMessage) bool) {
	t.Helper()
	b.mu.Lock()
	messages := b.messages
	b.messages = nil
	b.mu.Unlock()
	for _, m := range messages {
		switch {
		case expected != nil && expected(m):
			t.Logf("the browser's console, as expected: %s (%s)", m, m.URL)
		case m.IsException() || m.Type == chromedp.ConsoleError || m.Type == chromedp.ConsoleWarning:
			t.Errorf("the browser's console: %s (%s)", m, m.URL)
		default:
			t.Logf("the browser's console: %s (%s)", m, m.URL)
		}
	}
}
