package store

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

// impls are the stores every contract test runs against.
var impls = []struct {
	name string
	open func(t testing.TB) Store
}{
	{"memory", func(testing.TB) Store { return NewMemory() }},
	{"bolt", func(t testing.TB) Store {
		t.Helper()
		s, err := OpenBolt(filepath.Join(t.TempDir(), "relay.db"), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}},
}

// forEachStore runs fn against a fresh store of every implementation.
func forEachStore(t *testing.T, fn func(t *testing.T, s Store)) {
	t.Helper()
	for _, impl := range impls {
		t.Run(impl.name, func(t *testing.T) {
			s := impl.open(t)
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			fn(t, s)
		})
	}
}

func id(n int) ID {
	var i ID
	copy(i[:], fmt.Sprintf("event-%010d", n))
	return i
}

func event(n int, at time.Time) *Event {
	return &Event{ID: id(n), ReceivedAt: at, ContentType: "application/json", Body: fmt.Appendf(nil, `{"n":%d}`, n)}
}

func accept(t *testing.T, s Store, ev *Event, targets ...string) {
	t.Helper()
	dup, err := s.Accept(ev, targets, ev.ReceivedAt.Add(time.Hour), ev.ReceivedAt)
	if err != nil {
		t.Fatalf("Accept(%s): %v", ev.ID, err)
	}
	if dup {
		t.Fatalf("Accept(%s): duplicate, want new", ev.ID)
	}
}

func settle(t *testing.T, s Store, d *Delivery, o Outcome, want Change) {
	t.Helper()
	got, err := s.Settle(d, o)
	if err != nil {
		t.Fatalf("Settle(%s at %s, %v): %v", d.ID, d.Target, o, err)
	}
	if got != want {
		t.Fatalf("Settle(%s at %s, %v) = %+v, want %+v", d.ID, d.Target, o, got, want)
	}
}

func pending(t *testing.T, s Store) []Delivery {
	t.Helper()
	var out []Delivery
	if err := ForEachPending(s, func(d *Delivery) error { out = append(out, *d); return nil }); err != nil {
		t.Fatalf("ForEachPending: %v", err)
	}
	return out
}

func stats(t *testing.T, s Store, now time.Time) Stats {
	t.Helper()
	st, err := s.Stats(now)
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	return st
}

func checkStats(t *testing.T, s Store, now time.Time, pendingEvents int, pend, dead map[string]int) {
	t.Helper()
	st := stats(t, s, now)
	if st.PendingEvents != pendingEvents {
		t.Errorf("Stats.PendingEvents = %d, want %d", st.PendingEvents, pendingEvents)
	}
	if fmt.Sprint(st.Pending) != fmt.Sprint(pend) {
		t.Errorf("Stats.Pending = %v, want %v", st.Pending, pend)
	}
	if fmt.Sprint(st.Dead) != fmt.Sprint(dead) {
		t.Errorf("Stats.Dead = %v, want %v", st.Dead, dead)
	}
	// The backlog an engine loads agrees, its pending-event count kept
	// by every write rather than counted.
	b, err := s.Backlog()
	if err != nil {
		t.Fatalf("Backlog: %v", err)
	}
	defer b.Close()
	if n := b.PendingEvents(); n != pendingEvents {
		t.Errorf("Backlog.PendingEvents = %d, want %d", n, pendingEvents)
	}
	if got, want := b.Targets(), sortedKeys(pend); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Backlog.Targets = %v, want %v", got, want)
	}
	if got, err := b.Dead(); err != nil || fmt.Sprint(got) != fmt.Sprint(dead) {
		t.Errorf("Backlog.Dead = %v, %v; want %v", got, err, dead)
	}
	if got, want := b.DeadTargets(), sortedKeys(dead); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Backlog.DeadTargets = %v, want %v", got, want)
	}
}

func allDead(t *testing.T, s Store, target string) []DeadLetter {
	t.Helper()
	var all []DeadLetter
	cursor := ""
	for {
		list, next, err := s.DeadLetters(target, cursor, 2)
		if err != nil {
			t.Fatalf("DeadLetters: %v", err)
		}
		all = append(all, list...)
		if next == "" {
			return all
		}
		cursor = next
	}
}

func TestAcceptDuplicateSeenEvent(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		ev := event(1, t0)
		dup, err := s.Accept(ev, []string{"a", "b"}, t0.Add(time.Hour), t0)
		if err != nil || dup {
			t.Fatalf("first Accept = %v, %v; want new", dup, err)
		}
		// Accept must have copied the body: the caller's buffer is reused.
		ev.Body[0] = 'X'
		if dup, err := s.Accept(event(1, t0.Add(time.Second)), []string{"a"}, t0.Add(2*time.Hour), t0.Add(time.Second)); err != nil || !dup {
			t.Fatalf("second Accept = %v, %v; want duplicate", dup, err)
		}
		if seen, err := s.Seen(id(1), t0.Add(time.Minute)); err != nil || !seen {
			t.Errorf("Seen(stored) = %v, %v; want true", seen, err)
		}
		if seen, err := s.Seen(id(2), t0); err != nil || seen {
			t.Errorf("Seen(unknown) = %v, %v; want false", seen, err)
		}
		got, err := s.Event(id(1))
		if err != nil {
			t.Fatalf("Event: %v", err)
		}
		if got.ID != id(1) || !got.ReceivedAt.Equal(t0) || got.ContentType != "application/json" || string(got.Body) != `{"n":1}` {
			t.Errorf("Event = %+v (body %q), want the accepted event", got, got.Body)
		}
		if _, err := s.Event(id(2)); !errors.Is(err, ErrNotFound) {
			t.Errorf("Event(unknown) error = %v, want ErrNotFound", err)
		}
		p := pending(t, s)
		if len(p) != 2 || p[0].Target != "a" || p[1].Target != "b" {
			t.Fatalf("Pending = %+v, want one delivery at a and one at b", p)
		}
		for _, d := range p {
			if d.ID != id(1) || d.Attempts != 0 || !d.NextAt.Equal(t0) || !d.ReceivedAt.Equal(t0) {
				t.Errorf("pending delivery %+v, want due now with no attempts", d)
			}
		}
		checkStats(t, s, t0, 1, map[string]int{"a": 1, "b": 1}, map[string]int{})
	})
}

func TestAcceptWithoutTargetsRecordsOnlyTheKey(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		accept(t, s, event(1, t0))
		if seen, _ := s.Seen(id(1), t0); !seen {
			t.Error("key of an event matching no target not recorded")
		}
		if _, err := s.Event(id(1)); !errors.Is(err, ErrNotFound) {
			t.Errorf("Event error = %v, want ErrNotFound: nothing to deliver, nothing to keep", err)
		}
		if dup, _ := s.Accept(event(1, t0), nil, t0.Add(time.Hour), t0.Add(time.Minute)); !dup {
			t.Error("re-delivery of an event matching no target not a duplicate")
		}
		checkStats(t, s, t0, 0, map[string]int{}, map[string]int{})
		if st := stats(t, s, t0); st.Keys != 1 {
			t.Errorf("Stats.Keys = %d, want 1", st.Keys)
		}
	})
}

func TestKeyExpiry(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		accept(t, s, event(1, t0), "a") // key until t0+1h
		settle(t, s, &Delivery{ID: id(1), Target: "a"}, Delivered, Change{Pending: -1, PendingEvents: -1})
		if _, err := s.Event(id(1)); !errors.Is(err, ErrNotFound) {
			t.Errorf("Event after its last delivery: error %v, want ErrNotFound", err)
		}
		if seen, _ := s.Seen(id(1), t0.Add(59*time.Minute)); !seen {
			t.Error("delivered event's key forgotten before its expiry")
		}
		if seen, _ := s.Seen(id(1), t0.Add(time.Hour)); seen {
			t.Error("key still seen at its expiry")
		}
		// An expired key no longer makes a duplicate, swept or not.
		later := t0.Add(2 * time.Hour)
		dup, err := s.Accept(event(1, later), []string{"a"}, later.Add(time.Hour), later)
		if err != nil || dup {
			t.Fatalf("Accept after expiry = %v, %v; want new", dup, err)
		}
		if seen, _ := s.Seen(id(1), later.Add(59*time.Minute)); !seen {
			t.Error("re-accepted event's new key not recorded")
		}
	})
}

func TestNoKeyStillDedupesWhileStored(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		if dup, err := s.Accept(event(1, t0), []string{"a"}, time.Time{}, t0); err != nil || dup {
			t.Fatalf("Accept = %v, %v", dup, err)
		}
		if dup, _ := s.Accept(event(1, t0), []string{"a"}, time.Time{}, t0); !dup {
			t.Error("stored event accepted twice")
		}
		settle(t, s, &Delivery{ID: id(1), Target: "a"}, Delivered, Change{Pending: -1, PendingEvents: -1})
		if seen, _ := s.Seen(id(1), t0); seen {
			t.Error("event with no key seen after delivery")
		}
		if st := stats(t, s, t0); st.Keys != 0 {
			t.Errorf("Stats.Keys = %d, want 0", st.Keys)
		}
	})
}

// TestSettleLater: outcomes nobody waits for are recorded, in order, and
// their Change reaches the callback; an ack's write does not wait for them.
func TestSettleLater(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		accept(t, s, event(1, t0), "a", "b")
		accept(t, s, event(2, t0), "a")
		type result struct {
			ch  Change
			err error
		}
		if b, ok := s.(*Bolt); ok {
			b.settleDelay = time.Hour
		}
		got := make(chan result, 3)
		then := func(ch Change, err error) { got <- result{ch, err} }
		s.SettleLater(&Delivery{ID: id(1), Target: "a", Attempts: 1, NextAt: t0.Add(time.Minute)}, Retry, then)
		s.SettleLater(&Delivery{ID: id(1), Target: "a", Attempts: 2}, Delivered, then)
		s.SettleLater(&Delivery{ID: id(2), Target: "a", Attempts: 1}, Delivered, then)
		// An ack queued behind them commits them with it at once: with
		// bbolt holding outcomes an hour for company, the ack still
		// returns, and by then their callbacks have run.
		acked := make(chan error, 1)
		go func() {
			_, err := s.Accept(event(3, t0), []string{"b"}, t0.Add(time.Hour), t0)
			acked <- err
		}()
		select {
		case err := <-acked:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the ack waited for the outcomes' delay")
		}
		if n := len(got); n != 3 {
			t.Errorf("%d of 3 outcomes reported when the ack after them returned", n)
		}
		want := []Change{{}, {Pending: -1}, {Pending: -1, PendingEvents: -1}}
		for i, w := range want {
			r := <-got
			if r.err != nil || r.ch != w {
				t.Errorf("outcome %d: %+v, %v; want %+v", i, r.ch, r.err, w)
			}
		}
		checkStats(t, s, t0, 2, map[string]int{"b": 2}, map[string]int{})
	})
	for _, impl := range impls {
		s := impl.open(t)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		s.SettleLater(&Delivery{ID: id(1), Target: "a"}, Delivered, func(_ Change, err error) { done <- err })
		if err := <-done; !errors.Is(err, ErrClosed) {
			t.Errorf("%s: SettleLater after Close: %v, want ErrClosed", impl.name, err)
		}
	}
}

func TestSettle(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		accept(t, s, event(1, t0), "a", "b", "c")
		retry := &Delivery{
			ID: id(1), Target: "a", Attempts: 2, NextAt: t0.Add(time.Minute),
			FirstAttemptAt: t0, LastAttemptAt: t0.Add(time.Second), LastStatus: 503, LastError: "503 Service Unavailable",
		}
		settle(t, s, retry, Retry, Change{})
		var gotA Delivery
		for _, d := range pending(t, s) {
			if d.Target == "a" {
				gotA = d
			}
		}
		if gotA.Attempts != 2 || !gotA.NextAt.Equal(retry.NextAt) || !gotA.FirstAttemptAt.Equal(t0) ||
			!gotA.LastAttemptAt.Equal(retry.LastAttemptAt) || gotA.LastStatus != 503 || gotA.LastError != retry.LastError ||
			!gotA.ReceivedAt.Equal(t0) {
			t.Errorf("pending after Retry = %+v, want %+v", gotA, retry)
		}
		dead := *retry
		dead.Attempts, dead.LastStatus, dead.LastError = 3, 400, "400 Bad Request: no"
		settle(t, s, &dead, Dead, Change{Pending: -1, Dead: 1})
		settle(t, s, &Delivery{ID: id(1), Target: "b"}, Delivered, Change{Pending: -1})
		checkStats(t, s, t0, 1, map[string]int{"c": 1}, map[string]int{"a": 1})
		settle(t, s, &Delivery{ID: id(1), Target: "c"}, Delivered, Change{Pending: -1, PendingEvents: -1})
		checkStats(t, s, t0, 0, map[string]int{}, map[string]int{"a": 1})
		// The dead letter keeps the event.
		if _, err := s.Event(id(1)); err != nil {
			t.Fatalf("Event held by a dead letter: %v", err)
		}
		dl := allDead(t, s, "a")
		if len(dl) != 1 || dl[0].Attempts != 3 || dl[0].LastStatus != 400 || dl[0].LastError != dead.LastError || string(dl[0].Body) != `{"n":1}` {
			t.Errorf("dead letters = %+v", dl)
		}
		// Settling what no longer exists changes nothing.
		settle(t, s, &Delivery{ID: id(1), Target: "b"}, Delivered, Change{})
		settle(t, s, &Delivery{ID: id(1), Target: "a"}, Retry, Change{})
		settle(t, s, &Delivery{ID: id(1), Target: "a"}, Dead, Change{})
		settle(t, s, &Delivery{ID: id(9), Target: "a"}, Delivered, Change{})
		// A delivery that succeeds after being dead-lettered (a reload
		// removed its target meanwhile) clears the dead letter.
		settle(t, s, &Delivery{ID: id(1), Target: "a"}, Delivered, Change{Dead: -1})
		if _, err := s.Event(id(1)); !errors.Is(err, ErrNotFound) {
			t.Errorf("Event after its last reference went: error %v, want ErrNotFound", err)
		}
		checkStats(t, s, t0, 0, map[string]int{}, map[string]int{})
	})
}

func TestPendingOrderAndOldest(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		// Received out of id order.
		accept(t, s, event(3, t0.Add(time.Second)), "b", "a")
		accept(t, s, event(1, t0.Add(3*time.Second)), "a")
		accept(t, s, event(2, t0.Add(2*time.Second)), "a")
		var got []string
		for _, d := range pending(t, s) {
			got = append(got, fmt.Sprintf("%s:%s", d.Target, strings.TrimLeft(string(d.ID[6:]), "0")))
		}
		if want := "[a:3 a:2 a:1 b:3]"; fmt.Sprint(got) != want {
			t.Errorf("Pending order = %v, want %s", got, want)
		}
		for _, tt := range []struct {
			target string
			want   time.Time
			ok     bool
		}{
			{"a", t0.Add(time.Second), true},
			{"b", t0.Add(time.Second), true},
			{"c", time.Time{}, false},
		} {
			at, ok, err := s.OldestPending(tt.target)
			if err != nil || ok != tt.ok || !at.Equal(tt.want) {
				t.Errorf("OldestPending(%s) = %v, %v, %v; want %v, %v", tt.target, at, ok, err, tt.want, tt.ok)
			}
		}
		settle(t, s, &Delivery{ID: id(3), Target: "a"}, Delivered, Change{Pending: -1})
		if at, _, _ := s.OldestPending("a"); !at.Equal(t0.Add(2 * time.Second)) {
			t.Errorf("OldestPending(a) after delivering the oldest = %v", at)
		}
	})
}

func TestKillTarget(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		accept(t, s, event(1, t0), "gone")
		accept(t, s, event(2, t0.Add(time.Second)), "gone", "stay")
		accept(t, s, event(3, t0.Add(2*time.Second)), "gone")
		attempted := &Delivery{ID: id(3), Target: "gone", Attempts: 4, NextAt: t0.Add(time.Hour), LastAttemptAt: t0.Add(time.Minute), LastStatus: 502}
		settle(t, s, attempted, Retry, Change{})
		now := t0.Add(time.Hour)
		moved, settled, err := s.KillTarget("gone", "target removed from config", now)
		if err != nil || moved != 3 || settled != 2 {
			t.Fatalf("KillTarget = %d, %d, %v; want 3 moved, 2 settled", moved, settled, err)
		}
		checkStats(t, s, now, 1, map[string]int{"stay": 1}, map[string]int{"gone": 3})
		for _, dl := range allDead(t, s, "gone") {
			if dl.LastError != "target removed from config" {
				t.Errorf("dead letter %s: last error %q", dl.ID, dl.LastError)
			}
			wantAt, wantAttempts := now, 0
			if dl.ID == id(3) {
				wantAt, wantAttempts = attempted.LastAttemptAt, 4
			}
			if !dl.LastAttemptAt.Equal(wantAt) || dl.Attempts != wantAttempts {
				t.Errorf("dead letter %s: last attempt %v after %d attempts, want %v after %d", dl.ID, dl.LastAttemptAt, dl.Attempts, wantAt, wantAttempts)
			}
		}
		if moved, settled, err := s.KillTarget("never-seen", "x", now); err != nil || moved != 0 || settled != 0 {
			t.Errorf("KillTarget(unknown) = %d, %d, %v", moved, settled, err)
		}
	})
}

func TestDeadLettersPaging(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		// 7 dead letters: events 1-4 at a, events 2-4 at b; event 2 and 3
		// are received at the same instant.
		at := []time.Time{t0, t0.Add(time.Second), t0.Add(time.Second), t0.Add(2 * time.Second)}
		want := map[string]bool{}
		for n := 1; n <= 4; n++ {
			targets := []string{"a"}
			if n > 1 {
				targets = append(targets, "b")
			}
			accept(t, s, event(n, at[n-1]), targets...)
			for _, tg := range targets {
				settle(t, s, &Delivery{ID: id(n), Target: tg, Attempts: 1, LastStatus: 400}, Dead, Change{Pending: -1, Dead: 1, PendingEvents: map[bool]int{true: -1}[tg == targets[len(targets)-1]]})
				want[fmt.Sprintf("%s/%s", tg, id(n))] = true
			}
		}
		for _, tt := range []struct {
			target string
			want   int
		}{{"", 7}, {"a", 4}, {"b", 3}, {"none", 0}} {
			t.Run("target="+tt.target, func(t *testing.T) {
				seen := map[string]bool{}
				cursor := ""
				var pages []int
				for {
					list, next, err := s.DeadLetters(tt.target, cursor, 3)
					if err != nil {
						t.Fatalf("DeadLetters: %v", err)
					}
					pages = append(pages, len(list))
					for _, dl := range list {
						k := fmt.Sprintf("%s/%s", dl.Target, dl.ID)
						if seen[k] {
							t.Errorf("%s listed twice", k)
						}
						seen[k] = true
						if !want[k] || (tt.target != "" && dl.Target != tt.target) {
							t.Errorf("unexpected dead letter %s", k)
						}
						if dl.ContentType != "application/json" || !strings.HasPrefix(string(dl.Body), `{"n":`) || dl.LastStatus != 400 {
							t.Errorf("dead letter %s: %+v body %q", k, dl.Delivery, dl.Body)
						}
					}
					if next == "" {
						break
					}
					if len(list) != 3 {
						t.Fatalf("short page of %d with a next cursor", len(list))
					}
					cursor = next
				}
				if len(seen) != tt.want {
					t.Errorf("listed %d dead letters in pages %v, want %d", len(seen), pages, tt.want)
				}
			})
		}
		t.Run("exact last page has no cursor", func(t *testing.T) {
			list, next, err := s.DeadLetters("b", "", 3)
			if err != nil || len(list) != 3 || next != "" {
				t.Errorf("DeadLetters(b, limit 3) = %d, %q, %v; want 3 and no cursor", len(list), next, err)
			}
		})
		t.Run("default limit", func(t *testing.T) {
			if list, _, err := s.DeadLetters("", "", 0); err != nil || len(list) != 7 {
				t.Errorf("DeadLetters(limit 0) = %d, %v; want all 7", len(list), err)
			}
		})
		t.Run("bad cursor", func(t *testing.T) {
			for _, c := range []string{"zz", "00", hex.EncodeToString([]byte("a\x00short"))} {
				if _, _, err := s.DeadLetters("", c, 3); err == nil {
					t.Errorf("cursor %q accepted", c)
				}
			}
		})
	})
}

func TestReplay(t *testing.T) {
	// Dead letters: 1@a, 2@a, 2@b, 3@b, 4@c.
	setup := func(t *testing.T, s Store) {
		t.Helper()
		for n, targets := range map[int][]string{1: {"a"}, 2: {"a", "b"}, 3: {"b"}, 4: {"c"}} {
			accept(t, s, event(n, t0.Add(time.Duration(n)*time.Second)), targets...)
			for _, tg := range targets {
				if _, err := s.Settle(&Delivery{ID: id(n), Target: tg, Attempts: 25, LastError: "max attempts"}, Dead); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	tests := []struct {
		name        string
		ids         []ID
		target      string
		keep        func(string) bool
		want        []string // target/event, sorted
		wantRevived int
	}{
		{"all", nil, "", nil, []string{"a/1", "a/2", "b/2", "b/3", "c/4"}, 4},
		{"by target", nil, "b", nil, []string{"b/2", "b/3"}, 2},
		{"by ids", []ID{id(2), id(4), id(9)}, "", nil, []string{"a/2", "b/2", "c/4"}, 2},
		{"by ids and target", []ID{id(1), id(2)}, "a", nil, []string{"a/1", "a/2"}, 2},
		{"keep filter", nil, "", func(t string) bool { return t != "b" }, []string{"a/1", "a/2", "c/4"}, 3},
		{"keep filter excludes target", nil, "b", func(t string) bool { return t != "b" }, nil, 0},
		{"unknown id", []ID{id(9)}, "", nil, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			forEachStore(t, func(t *testing.T, s Store) {
				setup(t, s)
				now := t0.Add(time.Hour)
				moved, revived, err := s.Replay(tt.ids, tt.target, tt.keep, now)
				if err != nil {
					t.Fatalf("Replay: %v", err)
				}
				var got []string
				for _, d := range moved {
					got = append(got, fmt.Sprintf("%s/%d", d.Target, d.ID[15]-'0'))
					if d.Attempts != 0 || !d.NextAt.Equal(now) || !d.ReceivedAt.Equal(t0.Add(time.Duration(d.ID[15]-'0')*time.Second)) {
						t.Errorf("replayed %+v, want due now with a fresh attempt budget", d)
					}
				}
				sort.Strings(got)
				if fmt.Sprint(got) != fmt.Sprint(tt.want) {
					t.Errorf("replayed %v, want %v", got, tt.want)
				}
				if revived != tt.wantRevived {
					t.Errorf("revived %d, want %d", revived, tt.wantRevived)
				}
				st := stats(t, s, now)
				nPending := 0
				for _, n := range st.Pending {
					nPending += n
				}
				nDead := 0
				for _, n := range st.Dead {
					nDead += n
				}
				if nPending != len(tt.want) || nDead != 5-len(tt.want) || st.PendingEvents != tt.wantRevived {
					t.Errorf("after replay: %+v", st)
				}
				if p := pending(t, s); len(p) != len(tt.want) {
					t.Errorf("Pending lists %d, want %d", len(p), len(tt.want))
				}
				// Replaying again moves nothing.
				if again, _, _ := s.Replay(tt.ids, tt.target, tt.keep, now); len(again) != 0 {
					t.Errorf("second Replay moved %d", len(again))
				}
			})
		})
	}
}

func TestDeleteDead(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		accept(t, s, event(1, t0), "a", "b", "c")
		for _, tg := range []string{"a", "b"} {
			settle(t, s, &Delivery{ID: id(1), Target: tg}, Dead, Change{Pending: -1, Dead: 1})
		}
		n, err := s.DeleteDead(id(1), "a")
		if err != nil || fmt.Sprint(n) != "map[a:1]" {
			t.Fatalf("DeleteDead(a) = %v, %v", n, err)
		}
		if n, err := s.DeleteDead(id(1), "a"); err != nil || len(n) != 0 {
			t.Errorf("DeleteDead(a) again = %v, %v; want nothing", n, err)
		}
		if n, err := s.DeleteDead(id(9), ""); err != nil || len(n) != 0 {
			t.Errorf("DeleteDead(unknown) = %v, %v; want nothing", n, err)
		}
		n, err = s.DeleteDead(id(1), "")
		if err != nil || fmt.Sprint(n) != "map[b:1]" {
			t.Fatalf("DeleteDead(all) = %v, %v", n, err)
		}
		// Still pending at c: the event stays.
		if _, err := s.Event(id(1)); err != nil {
			t.Fatalf("Event still owed to c: %v", err)
		}
		checkStats(t, s, t0, 1, map[string]int{"c": 1}, map[string]int{})
		settle(t, s, &Delivery{ID: id(1), Target: "c"}, Dead, Change{Pending: -1, Dead: 1, PendingEvents: -1})
		if n, err := s.DeleteDead(id(1), ""); err != nil || fmt.Sprint(n) != "map[c:1]" {
			t.Fatalf("DeleteDead(all) = %v, %v", n, err)
		}
		if _, err := s.Event(id(1)); !errors.Is(err, ErrNotFound) {
			t.Errorf("Event after its last dead letter was deleted: error %v, want ErrNotFound", err)
		}
		checkStats(t, s, t0, 0, map[string]int{}, map[string]int{})
	})
}

func TestExpireKeys(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		for n := 1; n <= 5; n++ {
			// Keys expire at t0+1m .. t0+5m.
			if _, err := s.Accept(event(n, t0), nil, t0.Add(time.Duration(n)*time.Minute), t0); err != nil {
				t.Fatal(err)
			}
		}
		// Re-accepting an expired key moves its expiry on.
		if dup, err := s.Accept(event(1, t0), nil, t0.Add(10*time.Minute), t0.Add(90*time.Second)); err != nil || dup {
			t.Fatalf("Accept of an expired key = %v, %v", dup, err)
		}
		if st := stats(t, s, t0); st.Keys != 5 {
			t.Errorf("Stats.Keys = %d, want 5", st.Keys)
		}
		n, err := s.ExpireKeys(t0.Add(3 * time.Minute))
		if err != nil || n != 2 {
			t.Errorf("ExpireKeys(t0+3m) = %d, %v; want 2 (keys 2 and 3; key 1 was renewed)", n, err)
		}
		if st := stats(t, s, t0); st.Keys != 3 {
			t.Errorf("Stats.Keys = %d, want 3", st.Keys)
		}
		if n, _ := s.ExpireKeys(t0.Add(3 * time.Minute)); n != 0 {
			t.Errorf("second ExpireKeys = %d, want 0", n)
		}
		for _, tt := range []struct {
			n    int
			seen bool
		}{{1, true}, {2, false}, {3, false}, {4, true}, {5, true}} {
			if seen, _ := s.Seen(id(tt.n), t0.Add(3*time.Minute)); seen != tt.seen {
				t.Errorf("Seen(%d) = %v, want %v", tt.n, seen, tt.seen)
			}
		}
		if n, _ := s.ExpireKeys(t0.Add(time.Hour)); n != 3 {
			t.Errorf("ExpireKeys(t0+1h) = %d, want 3", n)
		}
	})
}

func TestClosedStore(t *testing.T) {
	for _, impl := range impls {
		t.Run(impl.name, func(t *testing.T) {
			s := impl.open(t)
			accept(t, s, event(1, t0), "a")
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
			checks := map[string]error{}
			_, checks["Accept"] = s.Accept(event(2, t0), []string{"a"}, t0, t0)
			_, checks["Seen"] = s.Seen(id(1), t0)
			_, checks["Event"] = s.Event(id(1))
			_, checks["Settle"] = s.Settle(&Delivery{ID: id(1), Target: "a"}, Delivered)
			_, checks["Backlog"] = s.Backlog()
			_, _, checks["OldestPending"] = s.OldestPending("a")
			_, _, checks["KillTarget"] = s.KillTarget("a", "x", t0)
			_, _, checks["DeadLetters"] = s.DeadLetters("", "", 10)
			_, _, checks["Replay"] = s.Replay(nil, "", nil, t0)
			_, checks["DeleteDead"] = s.DeleteDead(id(1), "")
			_, checks["ExpireKeys"] = s.ExpireKeys(t0)
			_, checks["Stats"] = s.Stats(t0)
			for name, err := range checks {
				if !errors.Is(err, ErrClosed) {
					t.Errorf("%s after Close: error %v, want ErrClosed", name, err)
				}
			}
		})
	}
}

func TestConcurrentAccept(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		// 8 writers, 50 events each, every event sent twice: each is new
		// exactly once, and group commits lose none.
		var wg sync.WaitGroup
		var fresh atomic.Int32
		errs := make(chan error, 8)
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 100 {
					n := (i/2)*8 + w
					if i%2 == 1 {
						n = (i/2)*8 + (w+1)%8 // also sent by the next writer
					}
					dup, err := s.Accept(event(n, t0), []string{"a"}, t0.Add(time.Hour), t0)
					if err != nil {
						errs <- err
						return
					}
					if !dup {
						fresh.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if got := fresh.Load(); got != 400 {
			t.Errorf("%d events accepted as new, want 400", got)
		}
		checkStats(t, s, t0, 400, map[string]int{"a": 400}, map[string]int{})
	})
}

func TestBoltReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	accept(t, s, event(1, t0), "a", "b")
	accept(t, s, event(2, t0.Add(time.Second)), "a")
	settle(t, s, &Delivery{ID: id(1), Target: "a", Attempts: 7, NextAt: t0.Add(time.Hour), FirstAttemptAt: t0, LastAttemptAt: t0.Add(time.Minute), LastStatus: 503, LastError: "503 Service Unavailable"}, Retry, Change{})
	settle(t, s, &Delivery{ID: id(1), Target: "b", Attempts: 1, LastStatus: 422, LastError: "422: nope"}, Dead, Change{Pending: -1, Dead: 1})
	settle(t, s, &Delivery{ID: id(2), Target: "a"}, Delivered, Change{Pending: -1, PendingEvents: -1})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = OpenBolt(path, time.Second)
	if err != nil {
		t.Fatalf("reopening: %v", err)
	}
	defer s.Close()
	p := pending(t, s)
	if len(p) != 1 {
		t.Fatalf("Pending after reopen = %+v, want event 1 at a", p)
	}
	if d := p[0]; d.ID != id(1) || d.Target != "a" || d.Attempts != 7 || !d.NextAt.Equal(t0.Add(time.Hour)) ||
		!d.FirstAttemptAt.Equal(t0) || d.LastStatus != 503 || d.LastError != "503 Service Unavailable" || !d.ReceivedAt.Equal(t0) {
		t.Errorf("pending after reopen = %+v", d)
	}
	dl := allDead(t, s, "")
	if len(dl) != 1 || dl[0].ID != id(1) || dl[0].Target != "b" || dl[0].LastStatus != 422 || dl[0].LastError != "422: nope" || string(dl[0].Body) != `{"n":1}` {
		t.Errorf("dead letters after reopen = %+v", dl)
	}
	for _, n := range []int{1, 2} {
		if dup, err := s.Accept(event(n, t0.Add(time.Minute)), []string{"a"}, t0.Add(2*time.Hour), t0.Add(time.Minute)); err != nil || !dup {
			t.Errorf("Accept(%d) after reopen = %v, %v; want duplicate", n, dup, err)
		}
	}
	checkStats(t, s, t0, 1, map[string]int{"a": 1}, map[string]int{"b": 1})
	if st := stats(t, s, t0); st.Keys != 2 {
		t.Errorf("Stats.Keys after reopen = %d, want 2", st.Keys)
	}
}

// TestBoltCountsPendingEventsOnce: a file without the pending-event count
// (written before the count existed) gets it, counted, at open.
func TestBoltCountsPendingEventsOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for n := range 5 {
		targets := []string{"a", "b"}
		if n%2 == 0 {
			targets = targets[1:]
		}
		if _, err := s.Accept(event(n, t0), targets, t0.Add(time.Hour), t0); err != nil {
			t.Fatal(err)
		}
	}
	settle(t, s, &Delivery{ID: id(1), Target: "a"}, Delivered, Change{Pending: -1})
	settle(t, s, &Delivery{ID: id(2), Target: "b"}, Delivered, Change{Pending: -1, PendingEvents: -1})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(keyPendingEvents) }); err != nil {
		t.Fatal(err)
	}
	db.Close()
	s, err = OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	checkStats(t, s, t0, 4, map[string]int{"a": 1, "b": 4}, map[string]int{})
}

// TestBoltCloseWritesFreelist: commits leave bbolt's freelist unwritten
// (the next open would rebuild it by reading every page), Close writes it.
// Read off the meta page bbolt uses, the one with the higher txid.
func TestBoltCloseWritesFreelist(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for n := range 50 {
		if _, err := s.Accept(event(n, t0), []string{"a"}, t0.Add(time.Hour), t0); err != nil {
			t.Fatal(err)
		}
		settle(t, s, &Delivery{ID: id(n), Target: "a"}, Delivered, Change{Pending: -1, PendingEvents: -1})
	}
	const noFreelist = ^uint64(0)
	freelist := func() uint64 {
		f, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// page header 16 bytes, then magic, version, page size, flags (4
		// each), root bucket (16), freelist pgid, pgid, txid (8 each).
		pageSize := int(binary.LittleEndian.Uint32(f[16+8:]))
		var best, txid uint64
		for _, off := range []int{0, pageSize} {
			m := f[off+16:]
			if tx := binary.LittleEndian.Uint64(m[48:]); tx >= txid {
				txid, best = tx, binary.LittleEndian.Uint64(m[32:])
			}
		}
		return best
	}
	if got := freelist(); got != noFreelist {
		t.Errorf("freelist page %d after commits, want none written", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := freelist(); got == noFreelist {
		t.Error("no freelist written at Close: the next open reads the whole file")
	}
}

func TestBoltOpenTwiceFails(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	start := time.Now()
	s2, err := OpenBolt(path, 100*time.Millisecond)
	if err == nil {
		s2.Close()
		t.Fatal("second OpenBolt of an open file succeeded")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("second OpenBolt took %s: it should give up after its timeout", took)
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "locked") {
		t.Errorf("error %q does not name the file and say it is locked", err)
	}
	if s.Path() != path {
		t.Errorf("Path() = %q, want %q", s.Path(), path)
	}
}

func TestBoltOpenBadPath(t *testing.T) {
	dir := t.TempDir()
	// A directory where the file should be.
	if _, err := OpenBolt(dir, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), dir) {
		t.Errorf("OpenBolt(a directory) error = %v, want one naming it", err)
	}
}

func TestParseID(t *testing.T) {
	for _, tt := range []struct {
		in string
		ok bool
	}{
		{id(1).String(), true},
		{strings.ToUpper(id(1).String()), true},
		{"abc", false},
		{strings.Repeat("z", 32), false},
		{id(1).String() + "00", false},
	} {
		got, err := ParseID(tt.in)
		if (err == nil) != tt.ok || (tt.ok && got != id(1)) {
			t.Errorf("ParseID(%q) = %s, %v; want ok %v", tt.in, got, err, tt.ok)
		}
	}
}

func benchmarkAcceptParallel(b *testing.B, s Store) {
	b.Helper()
	var next atomic.Int64
	body := []byte(`{"event_type":"address_verification.completed","event_id":"01HZX3Q9W4K2","api_version":"v3","data":{"status":"verified"}}`)
	targets := []string{"legacy"}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			n := next.Add(1)
			ev := &Event{ID: id(int(n)), ReceivedAt: t0, ContentType: "application/json", Body: body}
			if dup, err := s.Accept(ev, targets, t0.Add(time.Hour), t0); err != nil || dup {
				b.Errorf("Accept = %v, %v", dup, err)
				return
			}
		}
	})
}

// BenchmarkBoltAcceptParallel measures the durable ack path: concurrent
// Accepts of distinct events, each fsynced, group-committed.
func BenchmarkBoltAcceptParallel(b *testing.B) {
	s, err := OpenBolt(filepath.Join(b.TempDir(), "relay.db"), time.Second)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	benchmarkAcceptParallel(b, s)
}

func BenchmarkMemoryAcceptParallel(b *testing.B) {
	s := NewMemory()
	defer s.Close()
	benchmarkAcceptParallel(b, s)
}

// TestBoltFailedWriteSparesItsBatch: a write that fails on its own account
// fails alone; the writes committed in the same group still land.
func TestBoltFailedWriteSparesItsBatch(t *testing.T) {
	s, err := OpenBolt(filepath.Join(t.TempDir(), "relay.db"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const n = 64
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			targets := []string{"a"}
			if i%8 == 0 {
				targets = []string{""} // bbolt refuses an empty bucket name
			}
			_, errs[i] = s.Accept(event(i, t0), targets, t0.Add(time.Hour), t0)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		bad := i%8 == 0
		if (err != nil) != bad {
			t.Errorf("Accept %d: error %v, want failure %v", i, err, bad)
		}
		seen, _ := s.Seen(id(i), t0)
		if seen == bad {
			t.Errorf("Accept %d: stored %v, want %v", i, seen, !bad)
		}
	}
	checkStats(t, s, t0, n-n/8, map[string]int{"a": n - n/8}, map[string]int{})
}
