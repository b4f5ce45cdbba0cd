package storetest

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// killAll takes every delivery pending at target (n of them) and settles
// each dead after attempts attempts.
func (e *env) killAll(t *testing.T, target string, n, attempts int) {
	t.Helper()
	for _, l := range e.takeN(t, e.queue(t, target), n) {
		d := e.attempt(l, 400, "400 Bad Request", time.Time{})
		d.Attempts = attempts
		e.settle(t, l, store.Dead, d)
	}
}

// testDeadLettersPaging: pages of a limit resume after their cursor, in
// one stable order, each (event, target) once, at one target or all.
func testDeadLettersPaging(t *testing.T, h Harness) {
	e := newEnv(t, h)
	// 7 dead letters: events 1-4 at a, events 2-4 at b; events 2 and 3
	// were received at the same instant.
	base := e.c.Now().Add(-time.Minute)
	at := []time.Time{base, base.Add(time.Second), base.Add(time.Second), base.Add(2 * time.Second)}
	want := map[string]bool{}
	for n := 1; n <= 4; n++ {
		targets := []string{"a"}
		if n > 1 {
			targets = append(targets, "b")
		}
		e.accept(t, event(n, at[n-1]), targets...)
		for _, tg := range targets {
			want[fmt.Sprintf("%s/%s", tg, num(id(n)))] = true
		}
	}
	e.killAll(t, "a", 4, 1)
	e.killAll(t, "b", 3, 1)
	e.wantCounts(t, 0, map[string]pend{"a": {Dead: 4}, "b": {Dead: 3}})

	for _, tt := range []struct {
		target string
		want   int
	}{{"", 7}, {"a", 4}, {"b", 3}, {"none", 0}} {
		t.Run("target="+tt.target, func(t *testing.T) {
			var paged []string
			cursor := ""
			for range 100 {
				list, next, err := e.s.DeadLetters(t.Context(), tt.target, cursor, 3)
				if err != nil {
					t.Fatalf("DeadLetters(%q, %q, 3): %v", tt.target, cursor, err)
				}
				if len(list) > 3 {
					t.Fatalf("page of %d, limit 3", len(list))
				}
				for _, dl := range list {
					k := fmt.Sprintf("%s/%s", dl.Target, num(dl.ID))
					if slices.Contains(paged, k) {
						t.Errorf("%s listed twice", k)
					}
					paged = append(paged, k)
					if !want[k] || (tt.target != "" && dl.Target != tt.target) {
						t.Errorf("unexpected dead letter %s", k)
					}
					if dl.ContentType != "application/json" || !strings.HasPrefix(string(dl.Body), `{"n":`) || dl.LastStatus != 400 || dl.Attempts != 1 {
						t.Errorf("dead letter %s: %+v, body %q", k, dl.Delivery, dl.Body)
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
			if len(paged) != tt.want {
				t.Errorf("listed %d dead letters, want %d: %v", len(paged), tt.want, paged)
			}
			// One page of all of them lists them in the order the
			// pages did, every time.
			for range 2 {
				list, next, err := e.s.DeadLetters(t.Context(), tt.target, "", 100)
				if err != nil || next != "" {
					t.Fatalf("DeadLetters(%q, limit 100) = %d, %q, %v; want one page", tt.target, len(list), next, err)
				}
				var whole []string
				for _, dl := range list {
					whole = append(whole, fmt.Sprintf("%s/%s", dl.Target, num(dl.ID)))
				}
				if !slices.Equal(whole, paged) {
					t.Errorf("one page lists %v, the pages of 3 %v: the order is not stable", whole, paged)
				}
			}
		})
	}
	t.Run("exact last page has no cursor", func(t *testing.T) {
		list, next, err := e.s.DeadLetters(t.Context(), "b", "", 3)
		if err != nil || len(list) != 3 || next != "" {
			t.Errorf("DeadLetters(b, limit 3) = %d, %q, %v; want 3 and no cursor", len(list), next, err)
		}
	})
}

// testReplay: replayed dead letters are pending again, due at once with a
// fresh attempt budget, and taken again; a second identical Replay moves
// nothing more.
func testReplay(t *testing.T, h Harness) {
	// Dead letters: 1@a, 2@a, 2@b, 3@b, 4@c; event n received n seconds
	// after base.
	targetsOf := map[int][]string{1: {"a"}, 2: {"a", "b"}, 3: {"b"}, 4: {"c"}}
	tests := []struct {
		name   string
		ids    []store.ID
		target string
		keep   func(string) bool
		want   []string // target/event
	}{
		{"all", nil, "", nil, []string{"a/1", "a/2", "b/2", "b/3", "c/4"}},
		{"by target", nil, "b", nil, []string{"b/2", "b/3"}},
		{"by ids", []store.ID{id(2), id(4), id(9)}, "", nil, []string{"a/2", "b/2", "c/4"}},
		{"by ids and target", []store.ID{id(1), id(2)}, "a", nil, []string{"a/1", "a/2"}},
		{"keep filter", nil, "", func(t string) bool { return t != "b" }, []string{"a/1", "a/2", "c/4"}},
		{"keep filter excludes target", nil, "b", func(t string) bool { return t != "b" }, nil},
		{"unknown id", []store.ID{id(9)}, "", nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, h)
			base := e.c.Now().Add(-time.Minute)
			recv := func(n int) time.Time { return base.Add(time.Duration(n) * time.Second) }
			perTarget := map[string]int{}
			for n := 1; n <= 4; n++ {
				e.accept(t, event(n, recv(n)), targetsOf[n]...)
				for _, tg := range targetsOf[n] {
					perTarget[tg]++
				}
			}
			for _, tg := range []string{"a", "b", "c"} {
				e.killAll(t, tg, perTarget[tg], 25)
			}

			moved, err := e.s.Replay(t.Context(), tt.ids, tt.target, tt.keep)
			if err != nil {
				t.Fatalf("Replay: %v", err)
			}
			if moved != len(tt.want) {
				t.Errorf("Replay moved %d, want %d", moved, len(tt.want))
			}
			// What the counts should be with tt.want pending, the rest dead.
			counts := map[string]pend{}
			byTarget := map[string][]int{}
			events := map[int]bool{}
			for tg, k := range perTarget {
				counts[tg] = pend{Dead: k}
			}
			for _, w := range tt.want {
				var tg string
				var n int
				if _, err := fmt.Sscanf(strings.Replace(w, "/", " ", 1), "%s %d", &tg, &n); err != nil {
					t.Fatal(err)
				}
				c := counts[tg]
				c.Pending++
				c.Dead--
				if c.OldestPending.IsZero() || recv(n).Before(c.OldestPending) {
					c.OldestPending = recv(n)
				}
				counts[tg] = c
				byTarget[tg] = append(byTarget[tg], n)
				events[n] = true
			}
			e.wantCounts(t, len(events), counts)

			replayedAt := e.c.Now()
			var qs []store.Queue
			for _, tg := range []string{"a", "b", "c"} {
				q := e.queue(t, tg)
				qs = append(qs, q)
				leases := e.takeN(t, q, len(byTarget[tg]))
				for _, n := range byTarget[tg] {
					l, ok := leases[id(n)]
					if !ok {
						t.Errorf("replayed %d at %s not taken again", n, tg)
						continue
					}
					d := l.Delivery()
					if d.Attempts != 0 || !d.FirstAttemptAt.IsZero() || !d.ReceivedAt.Equal(recv(n)) || d.NextAt.After(replayedAt) {
						t.Errorf("replayed %d at %s: %d attempts, first %s, received %s, due %s; want a fresh budget, due at once",
							n, tg, d.Attempts, fmtTime(d.FirstAttemptAt), fmtTime(d.ReceivedAt), fmtTime(d.NextAt))
					}
					wantEvent(t, l.Event(), event(n, recv(n)))
				}
			}
			e.noneAll(t, "every replayed delivery taken", qs...)

			if again, err := e.s.Replay(t.Context(), tt.ids, tt.target, tt.keep); err != nil || again != 0 {
				t.Errorf("second Replay = %d, %v; want 0", again, err)
			}
			e.wantCounts(t, len(events), counts)
		})
	}
}

// testDeleteDead: DeleteDead removes the dead letters of one event at one
// target or all, and the event once nothing references it.
func testDeleteDead(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	ev := event(1, now)
	e.acceptNoKey(t, ev, "a", "b", "c")
	e.killAll(t, "a", 1, 3)
	e.killAll(t, "b", 1, 3)
	e.wantCounts(t, 1, map[string]pend{"a": {Dead: 1}, "b": {Dead: 1}, "c": {Pending: 1, OldestPending: now}})

	deleteDead := func(i store.ID, target string, want int) {
		t.Helper()
		if n, err := e.s.DeleteDead(t.Context(), i, target); err != nil || n != want {
			t.Fatalf("DeleteDead(%s, %q) = %d, %v; want %d", num(i), target, n, err, want)
		}
	}
	deleteDead(id(1), "a", 1)
	deleteDead(id(1), "a", 0)
	deleteDead(id(9), "", 0)
	e.wantCounts(t, 1, map[string]pend{"b": {Dead: 1}, "c": {Pending: 1, OldestPending: now}})
	deleteDead(id(1), "", 1)
	// Still owed to c: the event stays.
	if !e.seen(t, id(1)) {
		t.Fatal("event still owed to c not stored")
	}
	e.wantCounts(t, 1, map[string]pend{"c": {Pending: 1, OldestPending: now}})

	e.killAll(t, "c", 1, 3)
	e.wantCounts(t, 0, map[string]pend{"c": {Dead: 1}})
	deleteDead(id(1), "", 1)
	if e.seen(t, id(1)) {
		t.Error("event stored after its last dead letter was deleted")
	}
	e.wantCounts(t, 0, nil)
	e.wantDead(t, "")
}
