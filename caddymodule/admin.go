package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
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

// adminAPI serves the relays' state and dead letters on Caddy's admin
// endpoint:
//
//	GET    /webhook_relay/                                     every relay, with counts per target
//	GET    /webhook_relay/<name>/dead_letters?target=&limit=&cursor=
//	POST   /webhook_relay/<name>/dead_letters/replay          {"event_ids":[...],"target":"..."}
//	DELETE /webhook_relay/<name>/dead_letters/<event_id>?target=
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
	rest := strings.Trim(strings.TrimPrefix(r.URL.Path, "/webhook_relay/"), "/")
	if rest == "" {
		if r.Method != http.MethodGet {
			return apiErr(http.StatusMethodNotAllowed, "method %s not allowed", r.Method)
		}
		return a.overview(w, r)
	}
	parts := strings.Split(rest, "/")
	if len(parts) < 2 || parts[1] != "dead_letters" {
		return apiErr(http.StatusNotFound, "no such route: %s", r.URL.Path)
	}
	e := liveEngine(parts[0])
	if e == nil {
		return apiErr(http.StatusNotFound, "no relay named %q", parts[0])
	}
	switch {
	case len(parts) == 2 && r.Method == http.MethodGet:
		return a.list(w, r, e)
	case len(parts) == 3 && parts[2] == "replay" && r.Method == http.MethodPost:
		return a.replay(w, r, e)
	case len(parts) == 3 && r.Method == http.MethodDelete:
		return a.delete(w, r, e, parts[2])
	case len(parts) <= 3:
		return apiErr(http.StatusMethodNotAllowed, "method %s not allowed on %s", r.Method, r.URL.Path)
	}
	return apiErr(http.StatusNotFound, "no such route: %s", r.URL.Path)
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

type deadLetterJSON struct {
	EventID        string     `json:"event_id"`
	Target         string     `json:"target"`
	Attempts       int        `json:"attempts"`
	LastError      string     `json:"last_error"`
	LastStatus     int        `json:"last_status"`
	ReceivedAt     time.Time  `json:"received_at"`
	FirstAttemptAt *time.Time `json:"first_attempt_at"`
	LastAttemptAt  *time.Time `json:"last_attempt_at"`
	Body           string     `json:"body"`
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
	limit := 100
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return apiErr(http.StatusBadRequest, "limit must be a positive number")
		}
		limit = min(n, maxPageSize)
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
		out.DeadLetters = append(out.DeadLetters, deadLetterJSON{
			EventID:        d.ID.String(),
			Target:         d.Target,
			Attempts:       d.Attempts,
			LastError:      d.LastError,
			LastStatus:     d.LastStatus,
			ReceivedAt:     d.ReceivedAt.UTC(),
			FirstAttemptAt: timePtr(d.FirstAttemptAt),
			LastAttemptAt:  timePtr(d.LastAttemptAt),
			Body:           string(d.Body),
		})
	}
	return writeJSON(w, out)
}

func (a adminAPI) replay(w http.ResponseWriter, r *http.Request, e *relay.Engine) error {
	var req struct {
		EventIDs []string `json:"event_ids"`
		Target   string   `json:"target"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return apiErr(http.StatusBadRequest, "decoding request: %v (want {\"event_ids\":[...],\"target\":\"...\"}, both optional)", err)
	}
	ids := make([]store.ID, 0, len(req.EventIDs))
	for _, s := range req.EventIDs {
		id, err := store.ParseID(s)
		if err != nil {
			return apiErr(http.StatusBadRequest, "event id %q: %v", s, err)
		}
		ids = append(ids, id)
	}
	if req.EventIDs != nil && len(ids) == 0 {
		return writeJSON(w, map[string]int{"replayed": 0})
	}
	n, err := e.Replay(r.Context(), ids, req.Target)
	if err != nil {
		return apiErr(http.StatusServiceUnavailable, "replaying: %v", err)
	}
	return writeJSON(w, map[string]int{"replayed": n})
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
