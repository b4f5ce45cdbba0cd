package caddymodule

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

func init() {
	caddy.RegisterModule(Console{})
	httpcaddyfile.RegisterHandlerDirective("webhook_relay_console", parseConsoleCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("webhook_relay_console", httpcaddyfile.Before, "respond")
}

// Console is a web page for people: every relay of the Caddy process,
// its pending deliveries and dead letters, one event at every target, and
// replay, delete, pause and resume. It is a handler rather than an admin
// route because Caddy's admin endpoint refuses what a browser sends.
//
// Every page lives at the console's one path, told apart by its query,
// so that it works wherever it is mounted, prefix stripped or not.
type Console struct{}

// CaddyModule returns the Caddy module information.
func (Console) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.webhook_relay_console",
		New: func() caddy.Module { return new(Console) },
	}
}

func parseConsoleCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	h.Next()
	if h.NextArg() {
		return nil, h.ArgErr()
	}
	if h.NextBlock(0) {
		return nil, h.Errf("webhook_relay_console takes no options")
	}
	return new(Console), nil
}

//go:embed console/*.html
var consoleFiles embed.FS

var consoleTemplates = template.Must(template.New("").Funcs(template.FuncMap{
	"when":    consoleTime,
	"seconds": func(s float64) string { return (time.Duration(s * float64(time.Second))).Round(time.Second).String() },
	"plural": func(n int64, one, many string) string {
		if n == 1 {
			return one
		}
		return many
	},
	// q is a link to a page of the console; qs the same query for a
	// form's back field; back a link to such a field's page.
	"q":  func(kv ...string) template.URL { return template.URL("?" + consoleQuery(kv...)) },
	"qs": consoleQuery,
	"back": func(q string) template.URL {
		v, _ := url.ParseQuery(q)
		return template.URL("?" + v.Encode())
	},
}).ParseFS(consoleFiles, "console/*.html"))

// consoleToken is in every form of the console: a page of another site
// cannot read it, so cannot forge a POST even where the browser sends
// neither Origin nor Sec-Fetch-Site. One per process: a reload keeps
// open pages working.
var consoleToken = rand.Text()

// consolePage is how many entries a list shows at a time unless its
// query says (limit, at most maxPageSize).
const consolePage = 50

func consoleTime(t time.Time) string {
	if t.IsZero() {
		return "—"
	}
	return t.UTC().Format("2006-01-02 15:04:05Z")
}

// ServeHTTP serves the console's pages (GET) and actions (POST).
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	h := w.Header()
	// Nothing runs and nothing is fetched: a payload that slipped past
	// the escaping still could not act.
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cache-Control", "no-store")
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		return c.get(w, r)
	case http.MethodPost:
		return c.post(w, r)
	}
	h.Set("Allow", "GET, HEAD, POST")
	c.fail(w, http.StatusMethodNotAllowed, "method %s not allowed", r.Method)
	return nil
}

// pageData is what every page's template gets.
type pageData struct {
	Title string
	Token string
	Relay string
	Data  any
}

func (c *Console) render(w http.ResponseWriter, status int, name string, d pageData) {
	d.Token = consoleToken
	var buf bytes.Buffer
	if err := consoleTemplates.ExecuteTemplate(&buf, name, d); err != nil {
		http.Error(w, "rendering the page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

func (c *Console) fail(w http.ResponseWriter, status int, format string, args ...any) {
	c.render(w, status, "error", pageData{Title: http.StatusText(status), Data: fmt.Sprintf(format, args...)})
}

// failEngine answers an engine's error as the admin API would.
func (c *Console) failEngine(w http.ResponseWriter, what string, err error) {
	status := http.StatusServiceUnavailable
	switch {
	case errors.Is(err, relay.ErrUnknownTarget), errors.Is(err, relay.ErrUnknownEvent):
		status = http.StatusNotFound
	case errors.Is(err, relay.ErrUnavailable), errors.Is(err, store.ErrUnavailable),
		errors.Is(err, store.ErrClosed), errors.Is(err, context.DeadlineExceeded):
	default:
		status = http.StatusBadRequest
	}
	c.fail(w, status, "%s: %v", what, err)
}

func (c *Console) get(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	view := q.Get("view")
	if view == "" {
		c.overview(w, r)
		return nil
	}
	name := q.Get("relay")
	e := liveEngine(name)
	if e == nil {
		c.fail(w, http.StatusNotFound, "no relay named %q", name)
		return nil
	}
	switch view {
	case "dead", "pending":
		c.list(w, r, e, view)
	case "event":
		c.event(w, r, e)
	case "confirm":
		c.confirm(w, r, e)
	default:
		c.fail(w, http.StatusNotFound, "no page %q", view)
	}
	return nil
}

type consoleRelay struct {
	Name string
	relay.Overview
	Charts []chart
	// Rate is each target's deliveries per second over the last minute.
	Rate map[string]string
}

// rateWindow is what a delivery rate is averaged over.
const rateWindow = time.Minute

func newConsoleRelay(ctx context.Context, name string, e *relay.Engine) consoleRelay {
	ov := e.Overview(ctx) // first: it samples pending for the history
	h := e.History()
	cr := consoleRelay{Name: name, Overview: ov, Charts: relayCharts(h), Rate: map[string]string{}}
	for _, t := range cr.Targets {
		r := h.Rate(h.Deliveries[t.Name]["delivered"], rateWindow)
		switch {
		case r == 0:
			cr.Rate[t.Name] = "0"
		case r < 10:
			cr.Rate[t.Name] = strconv.FormatFloat(r, 'f', 2, 64)
		default:
			cr.Rate[t.Name] = strconv.FormatFloat(r, 'f', 0, 64)
		}
	}
	return cr
}

// consoleEngines are the relays of the process by name; of two engines
// sharing a name during a reload, the open one.
func consoleEngines() map[string]*relay.Engine {
	byName := map[string]*relay.Engine{}
	engines.Range(func(_, v any) bool {
		e := v.(*pooledEngine).Engine
		if prev := byName[e.Name()]; prev == nil || (!prev.IsOpen() && e.IsOpen()) {
			byName[e.Name()] = e
		}
		return true
	})
	return byName
}

func (c *Console) overview(w http.ResponseWriter, r *http.Request) {
	var relays []consoleRelay
	for name, e := range consoleEngines() {
		relays = append(relays, newConsoleRelay(r.Context(), name, e))
	}
	sort.Slice(relays, func(i, j int) bool { return relays[i].Name < relays[j].Name })
	c.render(w, http.StatusOK, "overview", pageData{Title: "Relays", Data: relays})
}

// consoleEntry is one delivery of a list.
type consoleEntry struct {
	store.Delivery
	EventID string
	Body    string
	Pending bool
}

type listData struct {
	Kind       string // dead or pending
	Target     string
	Targets    []string
	Entries    []consoleEntry
	Cursor     string
	NextCursor string
	Limit      string // as asked, "" for the default
	Back       string
}

// prettyBody indents a JSON body; any other body is shown as it is.
// The template escapes either.
func prettyBody(b []byte) string {
	var out bytes.Buffer
	if json.Valid(b) && json.Indent(&out, b, "", "  ") == nil {
		return out.String()
	}
	return strings.ToValidUTF8(string(b), "\uFFFD")
}

func targetNames(ov relay.Overview) []string {
	names := make([]string, 0, len(ov.Targets))
	for _, t := range ov.Targets {
		names = append(names, t.Name)
	}
	return names
}

func (c *Console) list(w http.ResponseWriter, r *http.Request, e *relay.Engine, kind string) {
	q := r.URL.Query()
	d := listData{Kind: kind, Target: q.Get("target"), Cursor: q.Get("cursor"), Targets: targetNames(e.Overview(r.Context()))}
	limit := consolePage
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			c.fail(w, http.StatusBadRequest, "limit must be a positive number")
			return
		}
		limit = min(n, maxPageSize)
		d.Limit = strconv.Itoa(limit)
	}
	d.Back = consoleQuery("view", kind, "relay", e.Name(), "target", d.Target, "cursor", d.Cursor, "limit", d.Limit)
	title := "Dead letters"
	if kind == "dead" {
		list, next, err := e.DeadLetters(r.Context(), d.Target, d.Cursor, limit)
		if err != nil {
			c.failEngine(w, "listing dead letters", err)
			return
		}
		d.NextCursor = next
		for _, dl := range list {
			d.Entries = append(d.Entries, consoleEntry{Delivery: dl.Delivery, EventID: dl.ID.String(), Body: prettyBody(dl.Body)})
		}
	} else {
		title = "Pending"
		list, next, err := e.Pending(r.Context(), d.Target, d.Cursor, limit)
		if err != nil {
			c.failEngine(w, "listing pending deliveries", err)
			return
		}
		d.NextCursor = next
		// A pending delivery carries no body: its event has it, read once
		// per event of the page.
		bodyOf := map[store.ID]string{}
		for _, p := range list {
			body, ok := bodyOf[p.ID]
			if !ok {
				st, err := e.Event(r.Context(), p.ID)
				switch {
				case err == nil && st.Event != nil:
					body = prettyBody(st.Event.Body)
				case err == nil, errors.Is(err, relay.ErrUnknownEvent):
					// settled since the listing
				default:
					c.failEngine(w, "reading a pending event", err)
					return
				}
				bodyOf[p.ID] = body
			}
			d.Entries = append(d.Entries, consoleEntry{Delivery: p, EventID: p.ID.String(), Body: body, Pending: true})
		}
	}
	c.render(w, http.StatusOK, "list", pageData{Title: title + " of " + e.Name(), Relay: e.Name(), Data: d})
}

type eventData struct {
	ID     string
	Found  bool
	Status relay.EventStatus
	Body   string
}

func (c *Console) event(w http.ResponseWriter, r *http.Request, e *relay.Engine) {
	raw := strings.TrimSpace(r.URL.Query().Get("id"))
	d := eventData{ID: raw}
	pd := pageData{Title: "Event of " + e.Name(), Relay: e.Name(), Data: &d}
	if raw == "" {
		c.render(w, http.StatusOK, "event", pd)
		return
	}
	id, err := store.ParseID(raw)
	if err != nil {
		c.fail(w, http.StatusBadRequest, "event id %q: %v", raw, err)
		return
	}
	if d.Status, err = e.Event(r.Context(), id); err != nil {
		c.failEngine(w, "looking up the event", err)
		return
	}
	d.Found = true
	if d.Status.Event != nil {
		d.Body = prettyBody(d.Status.Event.Body)
	}
	c.render(w, http.StatusOK, "event", pd)
}

// consoleAction is what a POST does, named in its form's action field.
type consoleAction struct {
	Verb  string // the question's verb
	bulk  bool   // takes a target and no id
	needs string // "id", "target", "sel" (dead letters picked in a list) or ""
}

var consoleActions = map[string]consoleAction{
	"replay":          {Verb: "Replay", needs: "id"},
	"delete":          {Verb: "Delete", needs: "id"},
	"replay_all":      {Verb: "Replay", bulk: true},
	"delete_all":      {Verb: "Delete", bulk: true},
	"replay_selected": {Verb: "Replay", needs: "sel"},
	"delete_selected": {Verb: "Delete", needs: "sel"},
	"pause":           {Verb: "Pause", needs: "target"},
	"resume":          {Verb: "Resume", needs: "target"},
}

type confirmData struct {
	Selected []string
	Action   string
	Verb     string
	Target   string
	ID       string
	Count    int64
	Back     string
	Question string
}

// confirm asks before a POST that replays or deletes.
func (c *Console) confirm(w http.ResponseWriter, r *http.Request, e *relay.Engine) {
	q := r.URL.Query()
	act, ok := consoleActions[q.Get("action")]
	if !ok {
		c.fail(w, http.StatusBadRequest, "no action %q", q.Get("action"))
		return
	}
	d := confirmData{Action: q.Get("action"), Verb: act.Verb, Target: q.Get("target"), ID: q.Get("id"), Back: q.Get("back")}
	switch {
	case act.bulk:
		for _, t := range e.Overview(r.Context()).Targets {
			if d.Target == "" || t.Name == d.Target {
				d.Count += t.DeadLetters
			}
		}
		at := "every target"
		if d.Target != "" {
			at = d.Target
		}
		d.Question = fmt.Sprintf("%s %s at %s?", act.Verb, deadLetterCount(int(d.Count)), at)
	case act.needs == "sel":
		sel, err := parseSelected(q["sel"])
		if err != nil {
			c.fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		d.Selected = q["sel"]
		d.Question = fmt.Sprintf("%s %s, as selected?", act.Verb, deadLetterCount(len(sel)))
	case act.needs == "id":
		at := "every target"
		if d.Target != "" {
			at = d.Target
		}
		d.Question = fmt.Sprintf("%s the dead letter of event %s at %s?", act.Verb, d.ID, at)
	default:
		d.Question = fmt.Sprintf("%s target %s?", act.Verb, d.Target)
	}
	c.render(w, http.StatusOK, "confirm", pageData{Title: "Confirm", Relay: e.Name(), Data: d})
}

func deadLetterCount(n int) string {
	if n == 1 {
		return "1 dead letter"
	}
	return strconv.Itoa(n) + " dead letters"
}

// sameOrigin refuses what another site's page could send: a browser
// names the page's origin in Origin and Sec-Fetch-Site.
func sameOrigin(r *http.Request) bool {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	if o := r.Header.Get("Origin"); o != "" && !strings.EqualFold(o, scheme+"://"+r.Host) {
		return false
	}
	if s := r.Header.Get("Sec-Fetch-Site"); s != "" && s != "same-origin" {
		return false
	}
	return true
}

func (c *Console) post(w http.ResponseWriter, r *http.Request) error {
	if !sameOrigin(r) {
		c.fail(w, http.StatusForbidden, "refused: the request comes from another site")
		return nil
	}
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		c.fail(w, http.StatusBadRequest, "reading the form: %v", err)
		return nil
	}
	if subtle.ConstantTimeCompare([]byte(r.PostForm.Get("token")), []byte(consoleToken)) != 1 {
		c.fail(w, http.StatusForbidden, "refused: the form's token is missing or stale; reload the page")
		return nil
	}
	f := r.PostForm
	name, action, target := f.Get("relay"), f.Get("action"), f.Get("target")
	act, ok := consoleActions[action]
	if !ok {
		c.fail(w, http.StatusBadRequest, "no action %q", action)
		return nil
	}
	e := liveEngine(name)
	if e == nil {
		c.fail(w, http.StatusNotFound, "no relay named %q", name)
		return nil
	}
	var ids []store.ID
	if act.needs == "id" {
		id, err := store.ParseID(f.Get("id"))
		if err != nil {
			c.fail(w, http.StatusBadRequest, "event id %q: %v", f.Get("id"), err)
			return nil
		}
		ids = []store.ID{id}
	}
	var sel []selected
	if act.needs == "sel" {
		var err error
		if sel, err = parseSelected(f["sel"]); err != nil {
			c.fail(w, http.StatusBadRequest, "%v", err)
			return nil
		}
	}
	if act.needs == "target" && target == "" {
		c.fail(w, http.StatusBadRequest, "%s needs a target", action)
		return nil
	}
	ctx := r.Context()
	var err error
	switch action {
	case "replay", "replay_all":
		_, err = e.Replay(ctx, ids, target)
	case "delete", "delete_all":
		_, err = e.DeleteDeadLetters(ctx, ids, target)
	case "replay_selected", "delete_selected":
		do := e.Replay
		if action == "delete_selected" {
			do = e.DeleteDeadLetters
		}
		for _, p := range sel {
			if _, err = do(ctx, []store.ID{p.id}, p.target); err != nil {
				break
			}
		}
	case "pause":
		err = e.Pause(ctx, target)
	case "resume":
		err = e.Resume(ctx, target)
	}
	if err != nil {
		c.failEngine(w, strings.ReplaceAll(action, "_", " "), err)
		return nil
	}
	// Back to the page the form was on (only a query: never another
	// path or site), so that a reload of it does not post again.
	back, err := url.ParseQuery(f.Get("back"))
	if err != nil {
		back = url.Values{}
	}
	w.Header().Set("Location", "?"+back.Encode())
	w.WriteHeader(http.StatusSeeOther)
	return nil
}

// selected is one dead letter picked in a list: the form's value
// "<event id>:<target>" (a target name holds no ':').
type selected struct {
	id     store.ID
	target string
}

func parseSelected(values []string) ([]selected, error) {
	if len(values) == 0 {
		return nil, errors.New("no dead letter selected")
	}
	out := make([]selected, 0, len(values))
	for _, v := range values {
		raw, target, ok := strings.Cut(v, ":")
		id, err := store.ParseID(raw)
		if err != nil || !ok || target == "" {
			return nil, fmt.Errorf("selection %q: want <event id>:<target>", v)
		}
		out = append(out, selected{id, target})
	}
	return out, nil
}

// consoleQuery encodes key, value pairs, leaving out empty values.
func consoleQuery(kv ...string) string {
	v := url.Values{}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] != "" {
			v.Set(kv[i], kv[i+1])
		}
	}
	return v.Encode()
}

// Interface guards.
var _ caddyhttp.MiddlewareHandler = (*Console)(nil)
