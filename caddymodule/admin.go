package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves the relays' state, pending deliveries, events and
// dead letters on Caddy's admin endpoint:
//
//	GET    /webhook_relay/                                     every relay, with counts per target
//	GET    /webhook_relay/<name>/dead_letters?target=&limit=&cursor=
//	POST   /webhook_relay/<name>/dead_letters/replay          {"event_ids":[...],"target":"..."}
//	POST   /webhook_relay/<name>/dead_letters/delete          {"event_ids":[...],"target":"..."}
//	DELETE /webhook_relay/<name>/dead_letters/<event_id>?target=
//	GET    /webhook_relay/<name>/pending?target=&limit=&cursor=
//	GET    /webhook_relay/<name>/events/<event_id>
//	POST   /webhook_relay/<name>/targets/<target>/pause
//	POST   /webhook_relay/<name>/targets/<target>/resume
//
// Path segments are unescaped, so that a name holding "/" can be named.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.webhook_relay",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/webhook_relay/", Handler: caddy.AdminHandlerFunc(a.serve)}}
}

const maxPageSize = 1000

func apiErr(status int, format string, args ...any) error {
	return caddy.APIError{HTTPStatus: status, Err: fmt.Errorf(format, args...)}
}

func (a adminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	rest := strings.Trim(strings.TrimPrefix(r.URL.EscapedPath(), "/webhook_relay/"), "/")
	if rest == "" {
		if r.Method != http.MethodGet {
			return apiErr(http.StatusMethodNotAllowed, "method %s not allowed", r.Method)
		}
		return a.overview(w, r)
	}
	parts := strings.Split(rest, "/")
	for i, p := range parts {
		u, err := url.PathUnescape(p)
		if err != nil {
			return apiErr(http.StatusBadRequest, "path %s: %v", r.URL.Path, err)
		}
		parts[i] = u
	}
	if len(parts) < 2 || !slices.Contains([]string{"dead_letters", "pending", "events", "targets"}, parts[1]) {
		return apiErr(http.StatusNotFound, "no such route: %s", r.URL.Path)
	}
	e := liveEngine(parts[0])
	if e == nil {
		return apiErr(http.StatusNotFound, "no relay named %q", parts[0])
	}
	// route is the handler of a path with the method it takes; nil when
	// no route has that path.
	var route func() error
	method := http.MethodGet
	switch n := len(parts); {
	case parts[1] == "dead_letters" && n == 2:
		route = func() error { return a.list(w, r, e) }
	case parts[1] == "dead_letters" && n == 3 && parts[2] == "replay":
		method, route = http.MethodPost, func() error { return a.replay(w, r, e) }
	case parts[1] == "dead_letters" && n == 3 && parts[2] == "delete" && r.Method == http.MethodPost:
		method, route = http.MethodPost, func() error { return a.deleteMany(w, r, e) }
	case parts[1] == "dead_letters" && n == 3:
		method, route = http.MethodDelete, func() error { return a.delete(w, r, e, parts[2]) }
	case parts[1] == "pending" && n == 2:
		route = func() error { return a.pending(w, r, e) }
	case parts[1] == "events" && n == 3:
		route = func() error { return a.event(w, r, e, parts[2]) }
	case parts[1] == "targets" && n == 4 && (parts[3] == "pause" || parts[3] == "resume"):
		method, route = http.MethodPost, func() error { return a.pause(w, r, e, parts[2], parts[3] == "pause") }
	}
	if route == nil {
		return apiErr(http.StatusNotFound, "no such route: %s", r.URL.Path)
	}
	if r.Method != method {
		return apiErr(http.StatusMethodNotAllowed, "method %s not allowed on %s", r.Method, r.URL.Path)
	}
	return route()
}

// engineErr turns an engine's error into the admin API's answer: 404 for
// what does not exist, 503 for a relay or store that cannot answer now,
// otherwise status.
func engineErr(status int, what string, err error) error {
	switch {
	case errors.Is(err, relay.ErrUnknownTarget), errors.Is(err, relay.ErrUnknownEvent):
		status = http.StatusNotFound
	case errors.Is(err, relay.ErrUnavailable):
		return apiErr(http.StatusServiceUnavailable, "relay not running")
	case errors.Is(err, store.ErrUnavailable), errors.Is(err, store.ErrClosed),
		errors.Is(err, context.DeadlineExceeded):
		status = http.StatusServiceUnavailable
	}
	return apiErr(status, "%s: %v", what, err)
}

// pageLimit reads a listing's limit: 100 when not given, at most
// maxPageSize.
func pageLimit(r *http.Request) (int, error) {
	v := r.URL.Query().Get("limit")
	if v == "" {
		return 100, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, apiErr(http.StatusBadRequest, "limit must be a positive number")
	}
	return min(n, maxPageSize), nil
}

type relayOverview struct {
	Name string `json:"name"`
	relay.Overview
}

func (a adminAPI) overview(w http.ResponseWriter, r *http.Request) error {
	out := struct {
		Relays []relayOverview `json:"relays"`
	}{Relays: []relayOverview{}}
	// During a reload that moves a relay to new storage, two engines
	// share its name for a moment: show the open one.
	byName := map[string]*relay.Engine{}
	engines.Range(func(_, v any) bool {
		e := v.(*pooledEngine).Engine
		name := e.Name()
		if prev := byName[name]; prev == nil || (!prev.IsOpen() && e.IsOpen()) {
			byName[name] = e
		}
		return true
	})
	for name, e := range byName {
		out.Relays = append(out.Relays, relayOverview{Name: name, Overview: e.Overview(r.Context())})
	}
	sort.Slice(out.Relays, func(i, j int) bool { return out.Relays[i].Name < out.Relays[j].Name })
	return writeJSON(w, out)
}

// deliveryJSON is what the dead-letter and pending routes show of a
// delivery.
type deliveryJSON struct {
	EventID        string     `json:"event_id"`
	Target         string     `json:"target"`
	Attempts       int        `json:"attempts"`
	LastError      string     `json:"last_error"`
	LastStatus     int        `json:"last_status"`
	ReceivedAt     time.Time  `json:"received_at"`
	FirstAttemptAt *time.Time `json:"first_attempt_at"`
	LastAttemptAt  *time.Time `json:"last_attempt_at"`
}

func deliveryOf(d *store.Delivery) deliveryJSON {
	return deliveryJSON{
		EventID:        d.ID.String(),
		Target:         d.Target,
		Attempts:       d.Attempts,
		LastError:      d.LastError,
		LastStatus:     d.LastStatus,
		ReceivedAt:     d.ReceivedAt.UTC(),
		FirstAttemptAt: timePtr(d.FirstAttemptAt),
		LastAttemptAt:  timePtr(d.LastAttemptAt),
	}
}

type deadLetterJSON struct {
	deliveryJSON
	Body string `json:"body"`
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

func (a adminAPI) list(w http.ResponseWriter, r *http.Request, e *relay.Engine) error {
	q := r.URL.Query()
	limit, err := pageLimit(r)
	if err != nil {
		return err
	}
	list, next, err := e.DeadLetters(r.Context(), q.Get("target"), q.Get("cursor"), limit)
	if err != nil {
		if errors.Is(err, relay.ErrUnavailable) {
			return apiErr(http.StatusServiceUnavailable, "relay not running")
		}
		return apiErr(http.StatusBadRequest, "listing dead letters: %v", err)
	}
	out := struct {
		DeadLetters []deadLetterJSON `json:"dead_letters"`
		NextCursor  string           `json:"next_cursor"`
	}{DeadLetters: make([]deadLetterJSON, 0, len(list)), NextCursor: next}
	for _, d := range list {
		out.DeadLetters = append(out.DeadLetters, deadLetterJSON{deliveryOf(&d.Delivery), string(d.Body)})
	}
	return writeJSON(w, out)
}

// selection is the body of replay and bulk delete: which dead letters.
type selection struct {
	ids    []store.ID
	target string
	// none: the request named an empty list of events, which selects
	// nothing (not every event, as no list does).
	none bool
}

func readSelection(w http.ResponseWriter, r *http.Request) (selection, error) {
	var req struct {
		EventIDs []string `json:"event_ids"`
		Target   string   `json:"target"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return selection{}, apiErr(http.StatusBadRequest, "decoding request: %v (want {\"event_ids\":[...],\"target\":\"...\"}, both optional)", err)
	}
	sel := selection{ids: make([]store.ID, 0, len(req.EventIDs)), target: req.Target}
	for _, s := range req.EventIDs {
		id, err := store.ParseID(s)
		if err != nil {
			return selection{}, apiErr(http.StatusBadRequest, "event id %q: %v", s, err)
		}
		sel.ids = append(sel.ids, id)
	}
	sel.none = req.EventIDs != nil && len(sel.ids) == 0
	return sel, nil
}

func (a adminAPI) replay(w http.ResponseWriter, r *http.Request, e *relay.Engine) error {
	sel, err := readSelection(w, r)
	if err != nil {
		return err
	}
	if sel.none {
		return writeJSON(w, map[string]int{"replayed": 0})
	}
	n, err := e.Replay(r.Context(), sel.ids, sel.target)
	if err != nil {
		return apiErr(http.StatusServiceUnavailable, "replaying: %v", err)
	}
	return writeJSON(w, map[string]int{"replayed": n})
}

func (a adminAPI) deleteMany(w http.ResponseWriter, r *http.Request, e *relay.Engine) error {
	sel, err := readSelection(w, r)
	if err != nil {
		return err
	}
	if sel.none {
		return writeJSON(w, map[string]int{"deleted": 0})
	}
	n, err := e.DeleteDeadLetters(r.Context(), sel.ids, sel.target)
	if err != nil {
		return engineErr(http.StatusServiceUnavailable, fmt.Sprintf("deleting (%d deleted before the error)", n), err)
	}
	return writeJSON(w, map[string]int{"deleted": n})
}

// pendingJSON is one entry of GET /webhook_relay/<name>/pending.
type pendingJSON struct {
	deliveryJSON
	NextAttemptAt *time.Time `json:"next_attempt_at"`
}

func (a adminAPI) pending(w http.ResponseWriter, r *http.Request, e *relay.Engine) error {
	q := r.URL.Query()
	limit, err := pageLimit(r)
	if err != nil {
		return err
	}
	list, next, err := e.Pending(r.Context(), q.Get("target"), q.Get("cursor"), limit)
	if err != nil {
		return engineErr(http.StatusBadRequest, "listing pending deliveries", err)
	}
	out := struct {
		Pending    []pendingJSON `json:"pending"`
		NextCursor string        `json:"next_cursor"`
	}{Pending: make([]pendingJSON, 0, len(list)), NextCursor: next}
	for _, d := range list {
		out.Pending = append(out.Pending, pendingJSON{deliveryOf(&d), timePtr(d.NextAt)})
	}
	return writeJSON(w, out)
}

// eventJSON is the answer of GET /webhook_relay/<name>/events/<event_id>.
type eventJSON struct {
	EventID string `json:"event_id"`
	// BodyKept is false for an event no longer stored: delivered (or
	// dropped) everywhere, only its dedupe key left; received_at, body
	// and content_type are then null.
	BodyKept    bool              `json:"body_kept"`
	ReceivedAt  *time.Time        `json:"received_at"`
	ContentType *string           `json:"content_type"`
	Body        *string           `json:"body"`
	Targets     []eventTargetJSON `json:"targets"`
}

// eventTargetJSON is an event's state at one target; the delivery's
// fields are there for the states pending and dead only.
type eventTargetJSON struct {
	Target     string `json:"target"`
	Configured bool   `json:"configured"`
	State      string `json:"state"`
	*deliveryStateJSON
}

type deliveryStateJSON struct {
	Attempts       int        `json:"attempts"`
	LastError      string     `json:"last_error"`
	LastStatus     int        `json:"last_status"`
	FirstAttemptAt *time.Time `json:"first_attempt_at"`
	LastAttemptAt  *time.Time `json:"last_attempt_at"`
	NextAttemptAt  *time.Time `json:"next_attempt_at,omitempty"`
}

func (a adminAPI) event(w http.ResponseWriter, r *http.Request, e *relay.Engine, rawID string) error {
	id, err := store.ParseID(rawID)
	if err != nil {
		return apiErr(http.StatusBadRequest, "event id %q: %v", rawID, err)
	}
	st, err := e.Event(r.Context(), id)
	if err != nil {
		return engineErr(http.StatusServiceUnavailable, "looking up the event", err)
	}
	out := eventJSON{EventID: id.String(), Targets: make([]eventTargetJSON, 0, len(st.Targets))}
	if st.Event != nil {
		body, ct := string(st.Event.Body), st.Event.ContentType
		out.BodyKept, out.ReceivedAt, out.ContentType, out.Body = true, timePtr(st.Event.ReceivedAt), &ct, &body
	}
	for _, et := range st.Targets {
		j := eventTargetJSON{Target: et.Target, Configured: et.Configured, State: et.State}
		if d := et.Delivery; d != nil {
			j.deliveryStateJSON = &deliveryStateJSON{
				Attempts:       d.Attempts,
				LastError:      d.LastError,
				LastStatus:     d.LastStatus,
				FirstAttemptAt: timePtr(d.FirstAttemptAt),
				LastAttemptAt:  timePtr(d.LastAttemptAt),
			}
			if et.State == relay.StatePending {
				j.NextAttemptAt = timePtr(d.NextAt)
			}
		}
		out.Targets = append(out.Targets, j)
	}
	return writeJSON(w, out)
}

func (a adminAPI) pause(w http.ResponseWriter, r *http.Request, e *relay.Engine, target string, paused bool) error {
	do, verb := e.Resume, "resuming"
	if paused {
		do, verb = e.Pause, "pausing"
	}
	if err := do(r.Context(), target); err != nil {
		return engineErr(http.StatusServiceUnavailable, verb, err)
	}
	return writeJSON(w, map[string]any{"target": target, "paused": paused})
}

func (a adminAPI) delete(w http.ResponseWriter, r *http.Request, e *relay.Engine, rawID string) error {
	id, err := store.ParseID(rawID)
	if err != nil {
		return apiErr(http.StatusBadRequest, "event id %q: %v", rawID, err)
	}
	n, err := e.DeleteDead(r.Context(), id, r.URL.Query().Get("target"))
	if err != nil {
		return apiErr(http.StatusServiceUnavailable, "deleting: %v", err)
	}
	return writeJSON(w, map[string]int{"deleted": n})
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

var _ caddy.AdminRouter = adminAPI{}
