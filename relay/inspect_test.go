package relay

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// inspectRelay is a relay with one target per state an event can have:
// ok delivers, bad answers 400 (dead), down answers 503 with a long
// backoff (pending), picky takes only events of another location
// (not_routed), and fresh drops events older than one delivered for
// their location (stale). All but ok and picky take location A only.
func inspectRelay(t *testing.T) (Config, map[string]*testTarget) {
	t.Helper()
	answer := func(status int) func(http.ResponseWriter, *http.Request, int) {
		return func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(status) }
	}
	targets := map[string]*testTarget{
		"ok":    newTestTarget(t, nil),
		"bad":   newTestTarget(t, answer(http.StatusBadRequest)),
		"down":  newTestTarget(t, answer(http.StatusServiceUnavailable)),
		"picky": newTestTarget(t, nil),
		"fresh": newTestTarget(t, nil),
	}
	at := func(loc string) []Match { return []Match{{Path: "data.location.id", Values: []string{loc}}} }
	bad := fastTarget("bad", targets["bad"].URL)
	bad.Match = at("A")
	down := fastTarget("down", targets["down"].URL)
	down.BackoffMin, down.BackoffMax = time.Hour, time.Hour
	down.Match = at("A")
	picky := fastTarget("picky", targets["picky"].URL)
	picky.Match = at("elsewhere")
	fresh := fastTarget("fresh", targets["fresh"].URL)
	fresh.DropStale = &DropStale{KeyPath: "data.location.id", TimePath: "event_timestamp"}
	fresh.Match = at("A")
	cfg := Config{Targets: []TargetConfig{fastTarget("ok", targets["ok"].URL), bad, down, picky, fresh}}
	return cfg, targets
}

func states(st EventStatus) map[string]EventTarget {
	out := map[string]EventTarget{}
	for _, et := range st.Targets {
		out[et.Target] = et
	}
	return out
}

// TestEventStates: one event's state at every target: delivered, dead
// with its error, pending with its attempts and next attempt, not
// routed, and stale (recorded when it was dropped); and once the event
// is gone from the store, delivered everywhere with no body kept.
func TestEventStates(t *testing.T) {
	cfg, targets := inspectRelay(t)
	e := openEngine(t, cfg, Options{OpenStore: boltStore(tempBolt(t))})
	newer := statusBody("newer", "A", 200)
	mustAccept(t, e, newer)
	waitFor(t, "the newer event delivered at fresh", 5*time.Second, func() bool {
		return targets["fresh"].count() == 1 && targetStats(e, "fresh").Pending == 0
	})
	older := statusBody("older", "A", 100)
	id := mustAccept(t, e, older)
	waitFor(t, "the older event settled at ok, bad and fresh, attempted at down", 5*time.Second, func() bool {
		s := e.Overview(t.Context()).Targets
		for _, ts := range s {
			if ts.Name == "ok" && ts.Pending != 0 || ts.Name == "bad" && ts.DeadLetters != 2 || ts.Name == "fresh" && ts.Pending != 0 {
				return false
			}
		}
		return targets["down"].count() == 2 && targets["ok"].count() == 2
	})
	var st EventStatus
	waitFor(t, "the attempt at down recorded", 5*time.Second, func() bool {
		var err error
		if st, err = e.Event(t.Context(), id); err != nil {
			t.Fatal(err)
		}
		d := states(st)["down"].Delivery
		return d != nil && d.Attempts == 1
	})
	if n := targets["fresh"].count(); n != 1 {
		t.Errorf("fresh got %d requests, want the newer event's alone", n)
	}
	if st.Event == nil || string(st.Event.Body) != older || st.Event.ReceivedAt.IsZero() {
		t.Fatalf("event %+v, want the older event's body and receipt time", st.Event)
	}
	got := states(st)
	if len(got) != 5 {
		t.Errorf("%d targets, want 5: %+v", len(got), st.Targets)
	}
	for name, want := range map[string]string{"ok": StateDelivered, "bad": StateDead, "down": StatePending, "picky": StateNotRouted, "fresh": StateStale} {
		if g := got[name]; g.State != want || !g.Configured {
			t.Errorf("%s: state %q (configured %v), want %q", name, g.State, g.Configured, want)
		}
	}
	if d := got["bad"].Delivery; d == nil || d.LastStatus != 400 || !strings.Contains(d.LastError, "400") || d.Attempts != 1 {
		t.Errorf("bad: %+v, want the dead letter with status 400 after 1 attempt", d)
	}
	if d := got["down"].Delivery; d == nil || d.LastStatus != 503 || d.NextAt.Before(time.Now().Add(30*time.Minute)) {
		t.Errorf("down: %+v, want status 503 and the next attempt in about an hour", d)
	}
	for _, name := range []string{"ok", "picky", "fresh"} {
		if got[name].Delivery != nil {
			t.Errorf("%s: a delivery %+v for a settled state", name, got[name].Delivery)
		}
	}

	// Pending lists the delivery at down with its attempt.
	list, next, err := e.Pending(t.Context(), "down", "", 1)
	if err != nil || len(list) != 1 || next == "" || list[0].Target != "down" || list[0].Attempts == 0 {
		t.Errorf("Pending(down, limit 1): %+v, next %q, %v; want one attempted delivery and a next page", list, next, err)
	}

	// An event only ok takes leaves the store once delivered: its key
	// says it was delivered everywhere.
	gone := statusBody("gone", "B", nil)
	goneID := mustAccept(t, e, gone)
	waitFor(t, "the third event to leave the store", 5*time.Second, func() bool {
		st, err := e.Event(t.Context(), goneID)
		return err == nil && st.Event == nil
	})
	st, err = e.Event(t.Context(), goneID)
	if err != nil {
		t.Fatal(err)
	}
	for _, et := range st.Targets {
		if et.State != StateDelivered || !et.Configured {
			t.Errorf("gone event at %s: %q, want delivered", et.Target, et.State)
		}
	}
	if len(st.Targets) != 5 {
		t.Errorf("gone event: %d targets, want every configured one", len(st.Targets))
	}

	var unknown store.ID
	if _, err := e.Event(t.Context(), unknown); !errors.Is(err, ErrUnknownEvent) {
		t.Errorf("Event of an unknown id: %v, want ErrUnknownEvent", err)
	}
}

// TestDeleteDeadLetters deletes dead letters by id, by target, and all.
func TestDeleteDeadLetters(t *testing.T) {
	bad := newTestTarget(t, func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(http.StatusBadRequest) })
	cfg := Config{Targets: []TargetConfig{fastTarget("a", bad.URL), fastTarget("b", bad.URL)}}
	e := openEngine(t, cfg, Options{OpenStore: memStore()})
	var ids []store.ID
	for i := range 4 {
		ids = append(ids, mustAccept(t, e, v3Body(fmt.Sprint(i))))
	}
	waitFor(t, "8 dead letters", 5*time.Second, func() bool { return len(deadLetters(t, e)) == 8 })
	for _, tt := range []struct {
		ids    []store.ID
		target string
		want   int
		left   int
	}{
		{ids[:1], "a", 1, 7},
		{ids[:2], "", 3, 4},
		{nil, "b", 2, 2},
		{nil, "", 2, 0},
		{nil, "", 0, 0},
	} {
		n, err := e.DeleteDeadLetters(t.Context(), tt.ids, tt.target)
		if err != nil || n != tt.want {
			t.Errorf("DeleteDeadLetters(%v, %q): %d, %v; want %d", tt.ids, tt.target, n, err, tt.want)
		}
		if left := len(deadLetters(t, e)); left != tt.left {
			t.Errorf("after DeleteDeadLetters(%v, %q): %d left, want %d", tt.ids, tt.target, left, tt.left)
		}
	}
}
